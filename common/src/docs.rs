//! Man pages and shell completions, made from a binary's clap definition so
//! they never drift from `--help`. Both binaries have a `completions SHELL`
//! command (printed to stdout) and a hidden `man-pages DIR` command, which
//! `scripts/package` runs to put the pages into the Debian packages.

use std::io::Write;
use std::path::Path;

pub use clap_complete::Shell;

/// Write one page per command into `dir` (section 1): `NAME.1`, and
/// `NAME-SUB.1` for each visible subcommand, nested ones too. Returns how
/// many pages were written.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let pages = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    Ok(pages)
}

/// Print the completion script of `shell` for `cmd` to `out`.
pub fn write_completions(shell: Shell, mut cmd: clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("tool")
            .about("Does things")
            .subcommand(
                clap::Command::new("add")
                    .about("Adds")
                    .arg(clap::Arg::new("size").long("size")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn a_page_for_each_visible_command_and_completions_name_the_options() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_man_pages(cli(), dir.path()).unwrap(), 2);
        let add = std::fs::read_to_string(dir.path().join("tool-add.1")).unwrap();
        assert!(add.contains("\\-\\-size"), "{add}");
        assert!(!dir.path().join("tool-secret.1").exists());

        let mut bash = Vec::new();
        write_completions(Shell::Bash, cli(), &mut bash);
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("--size") && bash.contains("complete -F"),
            "{bash}"
        );
    }
}
