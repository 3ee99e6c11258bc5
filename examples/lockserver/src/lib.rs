//! A small lock service in the spirit of Google's Chubby / the GFS lock server, to live-migrate
//! under load: `lockserver` keeps named locks in memory only and serves them over TCP;
//! `lockclient` drives it from several long-lived connections and checks every reply. Neither
//! knows anything about migrate: they are the kind of ordinary program migrate-run must carry.
//!
//! # Protocol
//!
//! ASCII over TCP, one request per line (`\n`, a `\r` before it is ignored), one reply line per
//! request, in request order. Names and owners are tokens of visible ASCII characters
//! (no spaces); the owner `-` is reserved (it means "free" in `HOLDER` replies).
//!
//! | request | reply |
//! |---|---|
//! | `ACQUIRE <name> <owner>` | `OK <op>` if the lock was free (it is now owner's) or already owner's, else `BUSY <holder> <op>` |
//! | `RELEASE <name> <owner>` | `OK <op>` if owner held it (it is now free), else `NOTHELD <op>` |
//! | `HOLDER <name>` | `HOLDER <owner> <op>`, or `HOLDER - <op>` if the lock is free |
//! | `STATS` | `STATS locks=<locks held> ops=<total ops> pid=<getpid()> started=<unix seconds at server start>` |
//! | anything else | `ERR <text>` |
//!
//! `<op>` is a server-wide operation counter, incremented for every request (malformed ones
//! included), so the op numbers one connection sees strictly increase: a lost, repeated or
//! reordered reply shows. A `STATS` reply's `ops=` is the op number of that `STATS` request.
//! Locks belong to owner names, not to connections: a client that disconnects keeps its locks.
//! A request line longer than [`MAX_LINE`] bytes gets `ERR line too long` and the connection
//! is closed.

use std::collections::HashMap;

/// Where `lockserver` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";

/// The longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 4096;

/// The owner shown by `HOLDER` for a free lock; refused as an owner name.
pub const FREE: &str = "-";

/// One parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Acquire { name: &'a str, owner: &'a str },
    Release { name: &'a str, owner: &'a str },
    Holder { name: &'a str },
    Stats,
}

fn check_token<'a>(what: &str, tok: &'a str) -> Result<&'a str, String> {
    if tok.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(tok)
    } else {
        Err(format!("{what} must be visible ASCII"))
    }
}

fn check_owner(tok: &str) -> Result<&str, String> {
    if tok == FREE {
        return Err(format!("owner {FREE:?} is reserved"));
    }
    check_token("owner", tok)
}

/// Parses one request line (without its newline); `Err` holds the text of the `ERR` reply.
pub fn parse_request(line: &str) -> Result<Request<'_>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let toks: Vec<&str> = line.split_ascii_whitespace().collect();
    match toks.as_slice() {
        ["ACQUIRE", name, owner] => {
            Ok(Request::Acquire { name: check_token("name", name)?, owner: check_owner(owner)? })
        }
        ["RELEASE", name, owner] => {
            Ok(Request::Release { name: check_token("name", name)?, owner: check_owner(owner)? })
        }
        ["HOLDER", name] => Ok(Request::Holder { name: check_token("name", name)? }),
        ["STATS"] => Ok(Request::Stats),
        [] => Err("empty request".to_string()),
        [cmd @ ("ACQUIRE" | "RELEASE"), ..] => Err(format!("usage: {cmd} <name> <owner>")),
        ["HOLDER", ..] => Err("usage: HOLDER <name>".to_string()),
        ["STATS", ..] => Err("usage: STATS".to_string()),
        [cmd, ..] => Err(format!("unknown request {cmd:?}")),
    }
}

/// The server's whole state: which owner holds which lock, and the operation counter.
#[derive(Debug)]
pub struct Locks {
    held: HashMap<String, String>,
    ops: u64,
    pid: u32,
    started: u64,
}

impl Locks {
    /// No lock held; `pid` and `started` (unix seconds) are what `STATS` reports.
    pub fn new(pid: u32, started: u64) -> Locks {
        Locks { held: HashMap::new(), ops: 0, pid, started }
    }

    /// Serves one request line (without its newline) and returns the reply line (without its
    /// newline). Counts the request, whatever it is.
    pub fn handle(&mut self, line: &str) -> String {
        self.ops += 1;
        let op = self.ops;
        match parse_request(line) {
            Ok(Request::Acquire { name, owner }) => match self.held.get(name) {
                Some(holder) if holder != owner => format!("BUSY {holder} {op}"),
                Some(_) => format!("OK {op}"),
                None => {
                    self.held.insert(name.to_string(), owner.to_string());
                    format!("OK {op}")
                }
            },
            Ok(Request::Release { name, owner }) => {
                if self.held.get(name).is_some_and(|h| h == owner) {
                    self.held.remove(name);
                    format!("OK {op}")
                } else {
                    format!("NOTHELD {op}")
                }
            }
            Ok(Request::Holder { name }) => {
                format!("HOLDER {} {op}", self.held.get(name).map_or(FREE, String::as_str))
            }
            Ok(Request::Stats) => {
                format!("STATS locks={} ops={op} pid={} started={}", self.held.len(), self.pid, self.started)
            }
            Err(text) => format!("ERR {text}"),
        }
    }

    /// Number of locks held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Number of requests served.
    pub fn ops(&self) -> u64 {
        self.ops
    }
}

/// One parsed reply line, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok {
        op: u64,
    },
    Busy {
        holder: String,
        op: u64,
    },
    NotHeld {
        op: u64,
    },
    /// `owner` is `None` for a free lock.
    Holder {
        owner: Option<String>,
        op: u64,
    },
    Stats {
        locks: u64,
        ops: u64,
        pid: u32,
        started: u64,
    },
    Err {
        text: String,
    },
}

impl Reply {
    /// The op number the reply carries (`ops=` for `STATS`); `None` for `ERR`.
    pub fn op(&self) -> Option<u64> {
        match self {
            Reply::Ok { op } | Reply::Busy { op, .. } | Reply::NotHeld { op } | Reply::Holder { op, .. } => Some(*op),
            Reply::Stats { ops, .. } => Some(*ops),
            Reply::Err { .. } => None,
        }
    }
}

fn num<T: std::str::FromStr>(tok: &str, what: &str) -> Result<T, String> {
    tok.parse().map_err(|_| format!("bad {what} {tok:?}"))
}

fn stats_field<T: std::str::FromStr>(tok: &str, key: &str) -> Result<T, String> {
    match tok.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
        Some(v) => num(v, key),
        None => Err(format!("expected {key}=, got {tok:?}")),
    }
}

/// Parses one reply line (without its newline); `Err` says what is malformed.
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if let Some(text) = line.strip_prefix("ERR ") {
        return Ok(Reply::Err { text: text.to_string() });
    }
    let toks: Vec<&str> = line.split_ascii_whitespace().collect();
    match toks.as_slice() {
        ["OK", op] => Ok(Reply::Ok { op: num(op, "op")? }),
        ["BUSY", holder, op] => Ok(Reply::Busy { holder: holder.to_string(), op: num(op, "op")? }),
        ["NOTHELD", op] => Ok(Reply::NotHeld { op: num(op, "op")? }),
        ["HOLDER", owner, op] => {
            Ok(Reply::Holder { owner: if *owner == FREE { None } else { Some(owner.to_string()) }, op: num(op, "op")? })
        }
        ["STATS", locks, ops, pid, started] => Ok(Reply::Stats {
            locks: stats_field(locks, "locks")?,
            ops: stats_field(ops, "ops")?,
            pid: stats_field(pid, "pid")?,
            started: stats_field(started, "started")?,
        }),
        _ => Err(format!("malformed reply {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(locks: &mut Locks, line: &str) -> Reply {
        let text = locks.handle(line);
        parse_reply(&text).unwrap_or_else(|e| panic!("{line:?} -> {text:?}: {e}"))
    }

    #[test]
    fn acquire_release_holder() {
        let mut l = Locks::new(42, 1000);
        assert_eq!(reply(&mut l, "HOLDER a"), Reply::Holder { owner: None, op: 1 });
        assert_eq!(reply(&mut l, "ACQUIRE a c1"), Reply::Ok { op: 2 });
        assert_eq!(reply(&mut l, "ACQUIRE a c1"), Reply::Ok { op: 3 }, "re-acquiring by the holder is OK");
        assert_eq!(reply(&mut l, "ACQUIRE a x"), Reply::Busy { holder: "c1".into(), op: 4 });
        assert_eq!(reply(&mut l, "HOLDER a"), Reply::Holder { owner: Some("c1".into()), op: 5 });
        assert_eq!(reply(&mut l, "RELEASE a x"), Reply::NotHeld { op: 6 });
        assert_eq!(reply(&mut l, "RELEASE b c1"), Reply::NotHeld { op: 7 });
        assert_eq!(reply(&mut l, "ACQUIRE b c2\r"), Reply::Ok { op: 8 });
        assert_eq!(reply(&mut l, "STATS"), Reply::Stats { locks: 2, ops: 9, pid: 42, started: 1000 });
        assert_eq!(reply(&mut l, "RELEASE a c1"), Reply::Ok { op: 10 });
        assert_eq!(reply(&mut l, "RELEASE a c1"), Reply::NotHeld { op: 11 });
        assert_eq!(reply(&mut l, "HOLDER a"), Reply::Holder { owner: None, op: 12 });
        assert_eq!((l.held(), l.ops()), (1, 12));
    }

    #[test]
    fn malformed_requests_are_errors_and_count() {
        let mut l = Locks::new(1, 2);
        for bad in ["", "  ", "acquire a b", "ACQUIRE a", "ACQUIRE a b c", "HOLDER", "STATS x", "FOO", "ACQUIRE a -"] {
            let text = l.handle(bad);
            assert!(text.starts_with("ERR "), "{bad:?} -> {text:?}");
            assert!(matches!(parse_reply(&text), Ok(Reply::Err { .. })));
        }
        assert_eq!(l.handle("ACQUIRE a\u{e9} o"), "ERR name must be visible ASCII");
        assert_eq!(l.ops(), 10);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn replies_parse_and_reject_garbage() {
        assert_eq!(parse_reply("OK 7").unwrap().op(), Some(7));
        assert_eq!(parse_reply("ERR nope").unwrap().op(), None);
        for bad in
            ["", "OK", "OK x", "BUSY c1", "HOLDER c1", "STATS locks=1", "STATS a=1 ops=2 pid=3 started=4", "YES 1"]
        {
            assert!(parse_reply(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
