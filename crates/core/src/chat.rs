//! `rwkv chat`: a conversation in the RWKV chat format (`User: …\n\nAssistant: …`), one
//! message per input line, with the state carried between turns (nothing is re-fed).

use crate::error::{Error, Result};
use crate::model::State;
use crate::session::{chat_turn, Session, StopRules};
use std::io::{BufRead, Write};

/// Converses over `input` and `out` until the input ends or `/quit`. `rules` bound each reply
/// (the turn separator `\n\n` is added to its stop strings); `prompt` prints `User: ` before
/// each message (for a terminal). Commands: `/reset` (back to the state the session had when
/// the loop started), `/save FILE`, `/load FILE` (the state as safetensors) and `/quit`; a
/// command that fails prints its error and the conversation goes on.
pub fn run(
    sess: &mut Session<'_>,
    mut rules: StopRules,
    input: impl BufRead,
    mut out: impl Write,
    prompt: bool,
) -> Result<()> {
    let base = sess.state().clone();
    // A reply ends where the model starts a new paragraph (the turn separator).
    if !rules.stop_strings.iter().any(|x| x == "\n\n") {
        rules.stop_strings.push("\n\n".to_string());
    }
    let mut lines = input.lines();
    loop {
        if prompt {
            let _ = write!(out, "User: ");
            let _ = out.flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("<stdin>", e))?;
        let msg = line.trim();
        if msg.is_empty() {
            continue;
        }
        if let Some(cmd) = msg.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            let res = match name {
                "quit" | "exit" => break,
                "reset" => sess
                    .set_state(base.clone())
                    .map(|_| "[state reset]".to_string()),
                "save" if !arg.is_empty() => sess
                    .state()
                    .save(arg)
                    .map(|_| format!("[state saved to {arg}]")),
                "load" if !arg.is_empty() => State::load(arg, sess.model().info())
                    .and_then(|st| sess.set_state(st))
                    .map(|_| format!("[state loaded from {arg}]")),
                _ => Err(Error::bad(format!(
                    "unknown command /{name}: use /reset, /save FILE, /load FILE or /quit"
                ))),
            };
            match res {
                Ok(done) => {
                    let _ = writeln!(out, "{done}");
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        sess.feed_text(&chat_turn(msg))?;
        let _ = write!(out, "Assistant:");
        let _ = out.flush();
        let g = sess.generate(&rules, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
            true
        })?;
        // The turn separator belongs in the state so that the next "User:" follows it; when
        // the reply ended on it, the state has already read it.
        if g.stop_string.as_deref() != Some("\n\n") {
            sess.feed_text("\n\n")?;
        }
        let _ = writeln!(out, "\n");
    }
    Ok(())
}
