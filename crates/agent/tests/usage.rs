//! The agent's command line, as an operator who runs it by hand meets it.

use std::process::Command;

#[test]
fn help_prints_the_usage_and_succeeds_and_no_arguments_is_an_error() {
    let help = Command::new(env!("CARGO_BIN_EXE_compute-agent")).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("compute-agent init CONFIG.json"));
    let none = Command::new(env!("CARGO_BIN_EXE_compute-agent")).output().unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("Usage:"));
}
