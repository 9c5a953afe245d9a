//! `safekeeper`: see DESIGN.md §2. The daemon arrives with its issue; this entry point exists so the
//! workspace layout is fixed and CI builds every crate from the start.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "safekeeper (not yet functional: only --help and --version work)")]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("safekeeper is not implemented yet; only --help and --version work")
}
