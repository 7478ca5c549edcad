//! Man pages and shell completions, made from a binary's clap definition so
//! they never drift from `--help`. Both binaries have a `completions SHELL`
//! command (printed to stdout) and a hidden `man-pages DIR` command, which
//! `scripts/package` runs to put the pages into the Debian packages.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The commands both binaries have, flattened into their own.
#[derive(Debug, clap::Subcommand)]
pub enum DocsCommand {
    /// Print the completion script of a shell to stdout.
    ///
    /// The Debian package installs them for bash, zsh and fish. By hand,
    /// e.g. for bash, with this command's name as NAME:
    ///   NAME completions bash > /etc/bash_completion.d/NAME
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (one per command) into DIR (for packaging).
    #[command(hide = true)]
    ManPages {
        /// Where to write NAME.1 and NAME-COMMAND.1.
        dir: PathBuf,
    },
}

impl DocsCommand {
    /// Carry it out for the binary whose command line is `cli`.
    pub fn run(self, cli: clap::Command) -> std::io::Result<()> {
        match self {
            DocsCommand::Completions { shell } => {
                let script = completions(shell, cli);
                match std::io::stdout().lock().write_all(&script) {
                    // `| head` read what it wanted
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                    done => done,
                }
            }
            DocsCommand::ManPages { dir } => {
                let n = write_man_pages(cli, &dir).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("writing man pages into {}: {e}", dir.display()),
                    )
                })?;
                println!("{n} man pages in {}", dir.display());
                Ok(())
            }
        }
    }
}

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

/// The completion script of `shell` for `cmd`.
pub fn completions(shell: Shell, mut cmd: clap::Command) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    script
}

/// Exit status of a command whose output's reader went away (`| head`):
/// what a shell reports for a program ended by SIGPIPE.
pub const BROKEN_PIPE_EXIT: u8 = 141;

/// Make a command whose standard output or error is a pipe closed early
/// (`cmd | head -1`) end quietly with [`BROKEN_PIPE_EXIT`], as other Unix
/// tools do, instead of a panic: `println!` panics when it cannot write.
/// (SIGPIPE itself stays ignored: the daemons write to sockets whose
/// peers may go at any time.)
pub fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(i32::from(BROKEN_PIPE_EXIT));
        }
        default(info)
    }));
}

/// Whether `e`, or an error it was caused by, is a write to a closed pipe.
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        at = e.source();
    }
    false
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

        let bash = String::from_utf8(completions(Shell::Bash, cli())).unwrap();
        assert!(
            bash.contains("--size") && bash.contains("complete -F"),
            "{bash}"
        );
    }
}
