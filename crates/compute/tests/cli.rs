//! The `compute` binary's own conveniences, run as a user runs them.

use std::process::Command;

fn compute() -> Command {
    Command::new(env!("CARGO_BIN_EXE_compute"))
}

#[test]
fn bash_completion_completes_subcommands_and_their_flags() {
    let out = compute().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8(out.stdout).unwrap();
    // Source it in a real bash and ask it what `compute sca<TAB>` and `compute volume ls --<TAB>` complete to. (The
    // script goes through a file: it is longer than one command-line argument may be.)
    let file = std::env::temp_dir().join(format!("compute-completion-{}.bash", std::process::id()));
    std::fs::write(&file, &script).unwrap();
    let probe = format!(
        "source {}\n\
         COMP_WORDS=(compute sca); COMP_CWORD=1; _compute compute sca compute; echo \"SUB ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(compute volume ls --); COMP_CWORD=3; _compute compute -- ls; echo \"FLAGS ${{COMPREPLY[*]}}\"\n",
        file.display()
    );
    let out = Command::new("bash").arg("-c").arg(&probe).output().expect("bash runs");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUB scaling-group"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("FLAGS") && l.contains("--data-dir")), "{text}");
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_refused_naming_the_choices() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = compute().args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }
    let out = compute().args(["completions", "tcsh"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bash") && err.contains("zsh") && err.contains("fish"), "{err}");
}
