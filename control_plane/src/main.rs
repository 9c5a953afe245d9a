//! `control_plane`: see DESIGN.md §2. The daemon arrives with its own issue; this entry point exists so the
//! workspace layout is fixed and CI builds every crate from the start.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "control_plane (not yet functional: only --help and --version work)")]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    utils::logging::init(utils::logging::LogFormat::Human)?;
    anyhow::bail!("control_plane is not implemented yet; only --help and --version work")
}
