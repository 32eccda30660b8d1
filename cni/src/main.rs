//! `underway`: the CNI plugin binary. All logic is in the library; this reads stdin and the
//! environment, and prints what the library answers.

use std::io::Read;

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = underway_cni::run(|k| std::env::var(k).ok(), &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.status);
}
