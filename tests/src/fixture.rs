//! A small EC2 world in one LocalStack account, made with the raw SDK (no underway code):
//! a VPC, a large subnet (LocalStack hangs when a subnet fills up), a security group and
//! instances. The test world of later issues builds on this.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::InstanceType;

use crate::localstack::Account;

#[derive(Debug, Clone)]
pub struct Ec2Fixture {
    pub client: Client,
    pub vpc_id: String,
    pub vpc_cidr: String,
    pub subnet_id: String,
    pub subnet_cidr: String,
    pub security_group: String,
    pub image_id: String,
}

impl Ec2Fixture {
    /// VPC 10.0.0.0/16 with subnet 10.0.0.0/18. Panics on failure: a test cannot go on without it.
    pub async fn create(account: &Account) -> Self {
        let client = Client::new(&account.sdk_config());
        let vpc = client.create_vpc().cidr_block("10.0.0.0/16").send().await.expect("CreateVpc");
        let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id").to_string();
        let subnet = client
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block("10.0.0.0/18")
            .availability_zone("us-east-1a")
            .send()
            .await
            .expect("CreateSubnet");
        let subnet_id = subnet.subnet().and_then(|s| s.subnet_id()).expect("subnet id").to_string();
        let sg = client
            .create_security_group()
            .group_name("underway-test")
            .description("underway test")
            .vpc_id(&vpc_id)
            .send()
            .await
            .expect("CreateSecurityGroup");
        let images = client.describe_images().send().await.expect("DescribeImages");
        let image_id = images.images().first().and_then(|i| i.image_id()).expect("an AMI").to_string();
        Ec2Fixture {
            client,
            vpc_id,
            vpc_cidr: "10.0.0.0/16".into(),
            subnet_id,
            subnet_cidr: "10.0.0.0/18".into(),
            security_group: sg.group_id().expect("sg id").to_string(),
            image_id,
        }
    }

    /// Adds a subnet of `cidr` to the VPC (in the fixture's AZ) and returns its id and the free
    /// address count EC2 reports for it.
    pub async fn subnet(&self, cidr: &str) -> (String, i32) {
        let out = self
            .client
            .create_subnet()
            .vpc_id(&self.vpc_id)
            .cidr_block(cidr)
            .availability_zone("us-east-1a")
            .send()
            .await
            .expect("CreateSubnet");
        let s = out.subnet().expect("subnet");
        (s.subnet_id().expect("subnet id").to_string(), s.available_ip_address_count().unwrap_or_default())
    }

    /// Runs one instance of `instance_type` in the subnet and returns its id.
    pub async fn run_instance(&self, instance_type: &str) -> String {
        let out = self
            .client
            .run_instances()
            .image_id(&self.image_id)
            .instance_type(InstanceType::from(instance_type))
            .subnet_id(&self.subnet_id)
            .security_group_ids(&self.security_group)
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .expect("RunInstances");
        out.instances().first().and_then(|i| i.instance_id()).expect("instance id").to_string()
    }

    pub async fn terminate(&self, instance_id: &str) {
        self.client.terminate_instances().instance_ids(instance_id).send().await.expect("TerminateInstances");
    }

    /// Adds a route table to the VPC (not associated with any subnet) and returns its id.
    pub async fn route_table(&self) -> String {
        let out = self.client.create_route_table().vpc_id(&self.vpc_id).send().await.expect("CreateRouteTable");
        out.route_table().and_then(|t| t.route_table_id()).expect("rtb id").to_string()
    }
}
