//! The command-line edge: environment and stdin in, one JSON document out,
//! exit status 0 or 1.

use std::io::{self, Read, Write};
use std::process::ExitCode;

use crate::{code, config, CniError};

/// The executable's whole life: what `skein-cni` runs, and what the
/// `skein` binary runs when invoked under the name `skein-cni` (one static
/// binary in the image).
pub fn cli_main() -> ExitCode {
    let env = |key: &str| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned());

    // Without CNI_COMMAND this is not a runtime calling; report that instead
    // of waiting on a stdin nobody will close.
    let mut stdin = Vec::new();
    if env("CNI_COMMAND").is_some_and(|c| !c.is_empty()) {
        if let Err(e) = io::stdin().read_to_end(&mut stdin) {
            return fail(
                &CniError::io("reading the network configuration from stdin", e),
                &stdin,
            );
        }
    }

    // VERSION needs no network; everything else may be a static
    // configuration that the agent's state file completes.
    let command = env("CNI_COMMAND");
    let filled = if command.as_deref() == Some("VERSION") {
        Ok(stdin.clone())
    } else {
        config::fill_from_state(&stdin, &config::read_state_file)
    };
    // DEL must succeed when there is nothing left to release: without the
    // agent's file (purged, or never leased) this node has no overlay
    // addresses to free, and the container's namespace takes its veth
    // with it. A runtime retrying DEL forever would keep the pod.
    if let (Some("DEL"), Err(e)) = (command.as_deref(), &filled) {
        if e.code == code::TRY_AGAIN_LATER {
            eprintln!("skein-cni: DEL: {}: nothing to release", e.msg);
            return ExitCode::SUCCESS;
        }
    }
    let outcome = filled
        .and_then(|conf| config::parse_request(&env, &conf))
        .and_then(|req| crate::run(&req));
    match outcome {
        Ok(outcome) => {
            if let Some(note) = outcome.note {
                eprintln!("{note}");
            }
            if let Some(out) = outcome.stdout {
                let mut stdout = io::stdout().lock();
                if writeln!(stdout, "{out}")
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, &stdin),
    }
}

fn fail(e: &CniError, stdin: &[u8]) -> ExitCode {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{}", e.to_json(config::reply_version(stdin)));
    let _ = stdout.flush();
    // The runtime logs stderr; the code makes grepping easier there.
    if e.code != code::DECODE {
        eprintln!("skein-cni: {e}");
    } else {
        eprintln!("skein-cni: {}: {}", e.msg, e.details);
    }
    ExitCode::FAILURE
}
