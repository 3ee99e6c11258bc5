//! Command-line arguments of the four commands (clap derive).

use crate::exit::HELP;
use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;

/// Start a program under migrate so that it can be checkpointed.
///
/// The program runs with libmigrate preloaded and address-space randomization off; migrate-run
/// execs it, so its PID, standard streams, signals and exit status are the program's own.
/// Checkpoint it later with `migrate-checkpoint PID` or by sending it the checkpoint signal.
#[derive(Debug, Parser)]
#[command(name = "migrate-run", version, after_long_help = HELP)]
pub struct RunArgs {
    /// Directory where checkpoints are written by default [default: $MIGRATE_CKPT_DIR, else
    /// the current directory]
    #[arg(long, value_name = "DIR")]
    pub ckpt_dir: Option<PathBuf>,

    /// Signal that triggers a checkpoint (name like USR2, HUP, RTMIN+3, or a number)
    #[arg(long, value_name = "SIG", default_value = "USR2", value_parser = crate::signals::parse_checkpoint_signal)]
    pub signal: i32,

    /// Checkpoint the program (and its tree) every SECS seconds into the checkpoint directory,
    /// leaving it running
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub interval: Option<f64>,

    /// With --interval: keep the newest N images of the program, remove older ones (and the
    /// older images an incremental one still takes pages from stay too)
    #[arg(long, value_name = "N", default_value = "3", requires = "interval", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: u32,

    /// With --interval: incremental images, each storing only the pages that changed since
    /// the one before (a full image every 8)
    #[arg(long, requires = "interval")]
    pub incremental: bool,

    /// With --interval: forked checkpoints (see migrate-checkpoint --fork): the program stops
    /// only while it is described, its memory is written in the background
    #[arg(long, requires = "interval")]
    pub fork: bool,

    /// Compress the memory in the images the program writes on its own (--interval, the
    /// checkpoint signal) with lz4; migrate-checkpoint chooses for its own with --compress
    #[arg(long, conflicts_with = "incremental")]
    pub compress: bool,

    /// The program to run and its arguments
    #[arg(value_name = "PROGRAM [ARGS]", required = true, num_args = 1.., trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

/// Checkpoint a process started with migrate-run.
///
/// Asks the process over its control socket to write an image and prints the image's path as
/// the last line on stdout.
#[derive(Debug, Parser)]
#[command(name = "migrate-checkpoint", version, after_long_help = HELP)]
pub struct CheckpointArgs {
    /// Let the process exit after the image is written (and wait until it is gone)
    #[arg(long)]
    pub kill: bool,

    /// Stop the program only while it is described: its memory is then written from a
    /// copy-on-write snapshot (a writer child per process) while it runs on. The frozen time
    /// no longer grows with the memory size; the snapshot costs memory for the pages the
    /// program changes meanwhile
    #[arg(long)]
    pub fork: bool,

    /// Migrate the process to the `migrate-resume --listen` daemon at HOST:PORT: the image is
    /// streamed (never written here), the process stays frozen until the target runs it, then
    /// exits; if anything fails it goes on here
    #[arg(long, value_name = "HOST:PORT")]
    pub to: Option<String>,

    /// The shared secret for --to (a file readable only by its owner, 16 bytes or more)
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// With --to: move this service address (ADDR/PREFIX, IPv4) to the target with the process
    /// (removed here, added there and announced with a gratuitous ARP)
    #[arg(long, value_name = "ADDR/PREFIX", requires = "to")]
    pub move_ip: Option<String>,

    /// With --to: send the memory ahead while the program still runs, so the freeze carries
    /// only what changed [default: when the program uses more than 64 MiB]
    #[arg(long, requires = "to", conflicts_with = "no_precopy")]
    pub precopy: bool,

    /// With --to: no pre-copy (the whole image travels during the freeze)
    #[arg(long, requires = "to")]
    pub no_precopy: bool,

    /// With --kill: do not hold the program's TCP traffic until the resume (by default an
    /// nftables table drops it, so peers retransmit instead of being reset)
    #[arg(long)]
    pub no_network_lock: bool,

    /// Also store the executable, its libraries and libmigrate in the image, for hosts that
    /// lack them (the dynamic loader must still be the same)
    #[arg(long)]
    pub with_binaries: bool,

    /// Store only the pages that changed since the program's newest image in the checkpoint
    /// directory (its parent); the image names its chain of ancestors, which must stay beside
    /// it (a full image when there is none, or after 8 in a chain)
    #[arg(long, conflicts_with = "to")]
    pub incremental: bool,

    /// Compress the memory in the image with lz4 (smaller image, more CPU while the program is
    /// stopped). With --to there is no pre-copy: the compressed image travels whole. Not with
    /// --incremental (an incremental image takes raw pages from its ancestors)
    #[arg(long, conflicts_with_all = ["precopy", "incremental"])]
    pub compress: bool,

    /// Directory to write the image to [default: the process's checkpoint directory]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Print the result (or the error) as one JSON object on stdout
    #[arg(long)]
    pub json: bool,

    /// Give up after this many seconds
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_timeout)]
    pub timeout: f64,

    /// The process to checkpoint
    #[arg(value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: i32,
}

/// Resume a program from a checkpoint image.
///
/// Verifies the image and this machine (CPU features, kernel vdso, binaries, libraries and open
/// files), then execs the saved program, which restores itself and continues where it was
/// checkpointed. The program's exit status becomes migrate-resume's.
#[derive(Debug, Parser)]
#[command(name = "migrate-resume", version, after_long_help = HELP)]
pub struct ResumeArgs {
    /// Resume even if files the program had open changed since the checkpoint (warns instead);
    /// changed binaries and libraries are still refused
    #[arg(long)]
    pub force: bool,

    /// Report errors as one JSON object {"error", "code"} on stdout
    #[arg(long)]
    pub json: bool,

    /// Insist on the original pid and thread ids, and say why if they cannot be had. By
    /// default migrate-resume already recreates them for real whenever the kernel allows it
    /// (clone3 with set_tid: root or CAP_CHECKPOINT_RESTORE, ids free), so that even raw system
    /// calls and the thread ids glibc keeps in mutexes stay valid; migrate-resume then stays as
    /// the program's parent and passes signals and the exit status through. Otherwise the
    /// program still sees its original ids through the translation table.
    #[arg(long, conflicts_with = "virtual_pids")]
    pub exact_pids: bool,

    /// Files that were deleted while open come back visible at their old path (or beside it)
    /// instead of open but unlinked
    #[arg(long)]
    pub keep_deleted: bool,

    /// Never recreate the original ids; use the translation table only (migrate-resume becomes
    /// the program, with no parent process kept)
    #[arg(long)]
    pub virtual_pids: bool,

    /// Let the program read this host's CLOCK_MONOTONIC and CLOCK_BOOTTIME. By default it runs
    /// in a time namespace whose clocks carry on from the values it read at the checkpoint
    /// (the stopped time and the host difference do not show)
    #[arg(long)]
    pub host_clocks: bool,

    /// Bring memory in lazily: the program continues as soon as its address space is laid
    /// out, and its private anonymous pages are read from the image on first touch (and in
    /// the background meanwhile), through userfaultfd. Where userfaultfd is not permitted
    /// (vm.unprivileged_userfaultfd=0 for an ordinary user) it warns and restores eagerly
    #[arg(long)]
    pub lazy: bool,

    /// Bring established TCP connections back reset (ECONNRESET on next use) instead of
    /// rebuilding them with TCP repair, e.g. when their peers are gone
    #[arg(long)]
    pub tcp_reset: bool,

    /// Run a daemon that receives migrations (`migrate-checkpoint --to`) on ADDR:PORT and
    /// resumes what it receives; peers must prove the --secret-file secret
    #[arg(long, value_name = "ADDR:PORT", requires = "secret_file", conflicts_with = "image")]
    pub listen: Option<String>,

    /// The shared secret for --listen (a file readable only by its owner, 16 bytes or more)
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// With --listen: exit after the first migration (0 if it was resumed)
    #[arg(long, requires = "listen")]
    pub once: bool,

    /// With --listen: where received images are kept until resumed [default:
    /// /var/tmp/migrate-spool-<uid>]
    #[arg(long, value_name = "DIR", requires = "listen")]
    pub spool: Option<PathBuf>,

    /// With --listen: drop a peer that sends nothing for this long [default: 30]; the handshake
    /// must be over within 10 s, or this if shorter (hidden: for tests and very slow links)
    #[arg(long, value_name = "SECS", requires = "listen", hide = true, value_parser = parse_timeout)]
    pub idle_timeout: Option<f64>,

    /// Tell whoever holds the other end of this socket when the tree is restored, and let it
    /// lift the network lock (used by --listen)
    #[arg(long, value_name = "FD", hide = true)]
    pub ready_fd: Option<i32>,

    /// The image written by migrate-checkpoint
    #[arg(value_name = "IMAGE", required_unless_present = "listen")]
    pub image: Option<PathBuf>,
}

/// Show what a checkpoint image contains.
#[derive(Debug, Parser)]
#[command(name = "migrate-inspect", version, after_long_help = HELP)]
pub struct InspectArgs {
    /// Print the whole image metadata as JSON
    #[arg(long)]
    pub json: bool,

    /// Skip verifying the checksum of every section (faster on large images)
    #[arg(long)]
    pub no_verify: bool,

    /// The image to inspect
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t <= 1e9 => Ok(t),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v >= 0.1 && v.is_finite() => Ok(v),
        _ => Err(format!("{text:?} is not an interval of at least 0.1 seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        RunArgs::command().debug_assert();
        CheckpointArgs::command().debug_assert();
        ResumeArgs::command().debug_assert();
        InspectArgs::command().debug_assert();
    }

    #[test]
    fn run_takes_the_rest_verbatim() {
        let a = RunArgs::try_parse_from(["migrate-run", "--signal", "USR1", "ls", "-l", "--signal", "x"]).unwrap();
        assert_eq!(a.signal, 10);
        assert_eq!(a.command, ["ls", "-l", "--signal", "x"]);
        let a = RunArgs::try_parse_from(["migrate-run", "--", "--weird", "-x"]).unwrap();
        assert_eq!(a.command, ["--weird", "-x"]);
        assert!(RunArgs::try_parse_from(["migrate-run"]).is_err());
        assert!(RunArgs::try_parse_from(["migrate-run", "--signal", "KILL", "ls"]).is_err());
    }

    #[test]
    fn checkpoint_args() {
        let a = CheckpointArgs::try_parse_from(["c", "--kill", "--timeout", "0.5", "42"]).unwrap();
        assert!(a.kill);
        assert_eq!(a.pid, 42);
        assert_eq!(a.timeout, 0.5);
        assert!(CheckpointArgs::try_parse_from(["c", "0"]).is_err());
        assert!(CheckpointArgs::try_parse_from(["c", "--timeout", "-1", "5"]).is_err());
        assert!(CheckpointArgs::try_parse_from(["c", "abc"]).is_err());
        assert!(CheckpointArgs::try_parse_from(["c", "--compress", "5"]).unwrap().compress);
        assert!(CheckpointArgs::try_parse_from(["c", "--to", "h:1", "--precopy", "--compress", "5"]).is_err());
    }
}
