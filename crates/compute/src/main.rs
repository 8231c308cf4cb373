//! `compute`: the operator CLI, and `compute serve`, which runs everything on one machine.

mod cli;
mod client;
mod function_cli;
mod image_cli;
mod runtime_file;
mod scaling_cli;
mod secret_cli;
mod serve;
mod settings;
mod volume_cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
