//! A VPC test world on LocalStack, held until Ctrl-C (or SIGTERM), then torn down.
//!
//! `underway-world [NODES] [INSTANCE_TYPE]` — prints one line per node: its namespace, instance,
//! IMDS endpoints and EC2 endpoint; then keeps the fabric in step with EC2 every second.
//! Run with root. Uses `UNDERWAY_LOCALSTACK_ENDPOINT` when set, else starts LocalStack.

use std::time::Duration;

use underway_tests::world::World;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let nodes: usize = match args.next().map(|a| a.parse()) {
        None => 2,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: underway-world [NODES>0] [INSTANCE_TYPE]");
            std::process::exit(2);
        }
    };
    let instance_type = args.next().unwrap_or_else(|| "m5.large".into());
    let world = match World::create().await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("underway-world: {e}");
            std::process::exit(1);
        }
    };
    println!("world {} account {} endpoint {}", world.id(), world.account().id, world.account().endpoint);
    println!(
        "vpc {} subnet {} ({}) router namespace {}",
        world.ec2().vpc_id,
        world.ec2().subnet_id,
        world.ec2().subnet_cidr,
        world.router_ns()
    );
    for _ in 0..nodes {
        match world.add_node(&instance_type).await {
            Ok(n) => println!(
                "node{} ns={} instance={} imds(root)={} imds(in ns)={} ec2(in ns)={}",
                n.index,
                n.ns,
                n.instance_id,
                n.imds.endpoint(),
                n.imds_endpoint_in_ns(),
                n.ec2_endpoint_in_ns()
            ),
            Err(e) => {
                eprintln!("underway-world: adding a node: {e}");
                world.teardown();
                std::process::exit(1);
            }
        }
    }
    world.start_sync_loop(Duration::from_secs(1));
    println!("ready; Ctrl-C to tear down");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    world.teardown();
    println!("torn down");
}
