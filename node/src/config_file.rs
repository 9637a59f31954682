//! `--config FILE`: a node's flags from a TOML file, so a volunteer keeps one
//! file instead of a long command line.
//!
//! Keys are the long flag names (`min-peers = 2`). The file is turned into
//! command-line arguments and parsed by the same clap definition as the
//! flags, so every value gets the flag's own validation and the file cannot
//! drift from the flags. Precedence: flag, then `P2PTRAIN_*` environment
//! variable, then the file, then the default.

use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// A key that is no flag of `p2ptrain node`.
    #[error("config file {}: unknown key `{key}` (keys are the long flag names of `p2ptrain node`, e.g. `min-peers`; see `p2ptrain config example`)", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value of a type the flag cannot take, or one its parser refuses.
    #[error("config file {}: key `{key}`: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Flags a config file must not set: the file itself, and clap's own.
const NOT_CONFIGURABLE: &[&str] = &["config", "help", "version"];

fn configurable(arg: &Arg) -> Option<&str> {
    let long = arg.get_long()?;
    (!arg.is_positional() && !NOT_CONFIGURABLE.contains(&long)).then_some(long)
}

fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

fn is_list(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// The command-line arguments a config file stands for, leaving out keys
/// for which `given(arg id)` says the flag or its environment variable was
/// set. Each value is checked by the flag's own parser here, so an error
/// names the key rather than the flag.
pub fn args_from_file(
    path: &Path,
    node: &Command,
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes =
        crate::small_file::read_capped(path, crate::small_file::SMALL_FILE_LIMIT, "a config file")
            .map_err(read)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    args_from_str(&text, path, node, given)
}

/// Whether `arg` names a file or a directory.
fn takes_a_path(arg: &Arg) -> bool {
    arg.get_value_names()
        .into_iter()
        .flatten()
        .any(|n| matches!(n.as_str(), "FILE" | "DIR" | "PATH"))
}

/// `value`, a path the config file at `file` gives, as the node must open
/// it: a relative one is taken from the file's directory (so a file works
/// from wherever the node is started), an absolute one as it is.
fn beside(file: &Path, value: &str) -> String {
    let given = Path::new(value);
    match file.parent() {
        Some(dir) if given.is_relative() && !dir.as_os_str().is_empty() => {
            dir.join(given).to_string_lossy().into_owned()
        }
        _ => value.to_string(),
    }
}

/// [`args_from_file`] on the file's text.
pub fn args_from_str(
    text: &str,
    path: &Path,
    node: &Command,
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: shortened(e.to_string().trim().replace('\n', " ")),
    })?;
    let mut out = Vec::new();
    // Flag ids already set, with the key that set them.
    let mut seen = std::collections::HashMap::new();
    for (key, value) in &table {
        let unknown = || ConfigError::UnknownKey {
            path: path.to_path_buf(),
            key: key.clone(),
        };
        // A flag's visible aliases (`sync-every` for `average-every`) are
        // its names too, as on the command line.
        let arg = node
            .get_arguments()
            .find(|a| {
                configurable(a).is_some_and(|long| {
                    long == key
                        || a.get_visible_aliases()
                            .into_iter()
                            .flatten()
                            .any(|alias| alias == key)
                })
            })
            .ok_or_else(unknown)?;
        let bad = |message: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
            message: shortened(message),
        };
        if let Some(other) = seen.insert(arg.get_id().as_str(), key.as_str()) {
            return Err(bad(format!("sets the same flag as `{other}`; keep one")));
        }
        let flag = format!("--{key}");
        let mut args: Vec<String> = Vec::new();
        match value {
            toml::Value::Boolean(on) if is_switch(arg) => {
                if *on {
                    args.push(flag.clone());
                }
            }
            _ if is_switch(arg) => return Err(bad("expected true or false".into())),
            // `--flag=value`, one argument: a value starting with `-` (a
            // negative number, say) is then taken as the value, and its
            // parser says what is wrong with it.
            // An empty list would silently mean the flag's default (for
            // `listen`, every interface), not "none".
            toml::Value::Array(items)
                if is_list(arg) && items.is_empty() && !arg.get_default_values().is_empty() =>
            {
                return Err(bad(
                    "an empty list would mean the default; give at least one value, or leave the key out"
                        .into(),
                ));
            }
            toml::Value::Array(items) if is_list(arg) => {
                for item in items {
                    let value = scalar(item)
                        .ok_or_else(|| bad("list items must be strings or numbers".into()))?;
                    args.push(format!("{flag}={value}"));
                }
            }
            toml::Value::Array(_) => return Err(bad("takes one value, not a list".into())),
            other => {
                let value =
                    scalar(other).ok_or_else(|| bad("expected a string or a number".into()))?;
                let value = if takes_a_path(arg) {
                    beside(path, &value)
                } else {
                    value
                };
                args.push(format!("{flag}={value}"));
            }
        }
        // The flag's own parser, on this key alone.
        let mut check = vec![OsString::from("node")];
        check.extend(args.iter().map(OsString::from));
        if let Err(e) = node.clone().try_get_matches_from(check) {
            let line =
                crate::error_text::clap_one_line(&e).unwrap_or_else(|| "invalid value".into());
            return Err(bad(line.trim_start_matches("error: ").to_string()));
        }
        if !given(arg.get_id().as_str()) {
            out.extend(args.into_iter().map(OsString::from));
        }
    }
    Ok(out)
}

/// Longest error message kept whole: a message quoting a huge value (a
/// pasted file, say) is cut, so the error stays one readable line.
const MAX_MESSAGE_CHARS: usize = 300;

fn shortened(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}… (cut)", &message[..cut]),
        None => message,
    }
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// A commented example config covering every public flag of `node`, with
/// its default; generated from the flags themselves.
pub fn example(node: &Command) -> String {
    let mut out = String::from(
        "# p2ptrain node --config this.toml\n\
         # Keys are the long flag names; flags given on the command line, then\n\
         # P2PTRAIN_* environment variables, override this file.\n",
    );
    for arg in node.get_arguments() {
        let Some(long) = configurable(arg) else {
            continue;
        };
        if arg.is_hide_set() {
            continue;
        }
        out.push('\n');
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            for line in help.to_string().lines() {
                out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
            }
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# (environment: {})\n", env.to_string_lossy()));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        if is_switch(arg) {
            out.push_str(&format!("{long} = false\n"));
        } else if is_list(arg) {
            let items: Vec<String> = defaults.iter().map(|d| toml_scalar(d)).collect();
            let line = format!("{long} = [{}]\n", items.join(", "));
            if defaults.is_empty() {
                out.push_str(&format!("# {line}"));
            } else {
                out.push_str(&line);
            }
        } else {
            match defaults.first() {
                Some(d) => out.push_str(&format!("{long} = {}\n", toml_scalar(d))),
                None => {
                    let hint = arg
                        .get_value_names()
                        .and_then(|v| v.first())
                        .map_or("VALUE".to_string(), |v| v.to_string());
                    out.push_str(&format!("# {long} = \"{hint}\"\n"));
                }
            }
        }
    }
    out
}

/// A default value as TOML: numbers bare, everything else quoted.
fn toml_scalar(s: &str) -> String {
    if s.parse::<i64>().is_ok() || (s.parse::<f64>().is_ok_and(f64::is_finite) && s.contains('.')) {
        s.to_string()
    } else {
        toml::Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Command {
        crate::cli::node_command()
    }

    fn args(text: &str) -> Result<Vec<String>, ConfigError> {
        args_from_str(text, Path::new("t.toml"), &node(), |_| false)
            .map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn relative_paths_are_taken_from_the_files_directory() {
        let text = "data = \"mnist\"\nrun-dir = \"/abs/runs\"\nswarm = \"s\"\n";
        let got = args_from_str(text, Path::new("conf/swarm.toml"), &node(), |_| false).unwrap();
        let got: Vec<String> = got
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(got.contains(&"--data=conf/mnist".to_string()), "{got:?}");
        assert!(got.contains(&"--run-dir=/abs/runs".to_string()), "{got:?}");
        // Not a path: as it is.
        assert!(got.contains(&"--swarm=s".to_string()), "{got:?}");
        // A file in the current directory: nothing to add.
        let here = args_from_str("data = \"mnist\"", Path::new("swarm.toml"), &node(), |_| {
            false
        });
        assert_eq!(here.unwrap(), vec![OsString::from("--data=mnist")]);
    }

    #[test]
    fn keys_become_flags() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let a = args(&format!(
            "min-peers = 3\nlr = 0.01\nno-mdns = true\nevents = false\n\
             bootstrap = [\"/ip4/127.0.0.1/udp/1/quic-v1/p2p/{peer}\", \"/ip4/127.0.0.2/udp/1/quic-v1/p2p/{peer}\"]\n",
        ))
        .unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("--min-peers=3"), "{joined}");
        assert!(joined.contains("--lr=0.01"), "{joined}");
        assert!(joined.contains("--no-mdns"), "{joined}");
        assert!(!joined.contains("--events"), "{joined}");
        assert_eq!(
            a.iter().filter(|s| s.starts_with("--bootstrap=")).count(),
            2
        );
    }

    #[test]
    fn a_flag_alias_is_a_key_too_but_only_once() {
        let a = args("sync-every = 50\n").unwrap();
        assert!(a.join(" ").contains("--sync-every=50"), "{a:?}");
        let err = args("sync-every = 50\naverage-every = 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("same flag as"), "{text}");
    }

    #[test]
    fn a_huge_bad_value_is_not_echoed_whole() {
        let e = args(&format!("swarm = \"{}\"", "é".repeat(100_000)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`swarm`") && e.contains("… (cut)"), "{e}");
        assert!(e.chars().count() < 500, "{} chars", e.chars().count());
    }

    #[test]
    fn the_global_log_format_may_be_set_in_the_file() {
        assert_eq!(
            args("log-format = \"json\"").unwrap(),
            ["--log-format=json"]
        );
        let e = args("log-format = \"xml\"").unwrap_err().to_string();
        assert!(e.contains("`log-format`") && e.contains("xml"), "{e}");
    }

    #[test]
    fn given_flags_win_over_the_file() {
        let a = args_from_str("min-peers = 3\nlr = 0.5\n", Path::new("t"), &node(), |id| {
            id == "min_peers"
        })
        .unwrap();
        assert_eq!(a, vec![OsString::from("--lr=0.5")]);
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = args("stepz = 3").unwrap_err().to_string();
        assert!(e.contains("`stepz`") && e.contains("t.toml"), "{e}");
        let e = args("min-peers = \"two\"").unwrap_err().to_string();
        assert!(e.contains("`min-peers`"), "{e}");
        let e = args("aggregation = \"median\"").unwrap_err().to_string();
        assert!(e.contains("`aggregation`"), "{e}");
        let e = args("no-mdns = 3").unwrap_err().to_string();
        assert!(
            e.contains("`no-mdns`") && e.contains("true or false"),
            "{e}"
        );
        let e = args("swarm = [\"a\"]").unwrap_err().to_string();
        assert!(e.contains("`swarm`") && e.contains("list"), "{e}");
        let e = args("config = \"x.toml\"").unwrap_err().to_string();
        assert!(e.contains("`config`"), "{e}");
        // `listen = []` meant every interface (the default), not "none".
        let e = args("listen = []").unwrap_err().to_string();
        assert!(e.contains("`listen`") && e.contains("empty list"), "{e}");
        // Without a default, an empty list is just none.
        assert!(args("bootstrap = []").unwrap().is_empty());
        let e = args("min-peers = ").unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
        // A negative value reaches the flag's parser, which names it (it
        // used to read as an unknown flag `-5`).
        let e = args("steps = -5").unwrap_err().to_string();
        assert!(e.contains("`steps`") && e.contains("'-5'"), "{e}");
        let e = args("outer-lr = -0.5").unwrap_err().to_string();
        assert!(e.contains("outer learning rate"), "{e}");
    }

    #[test]
    fn the_example_loads_and_sets_only_defaults() {
        let text = example(&node());
        assert!(text.contains("min-peers = "), "{text}");
        assert!(text.contains("# Swarm name"), "{text}");
        assert!(!text.contains("misbehave"), "hidden flags stay out: {text}");
        let a = args(&text).unwrap();
        let mut argv = vec![OsString::from("node")];
        argv.extend(a.iter().map(OsString::from));
        let from_file = node().try_get_matches_from(argv).unwrap();
        let plain = node().try_get_matches_from(["node"]).unwrap();
        for arg in node().get_arguments() {
            let id = arg.get_id().as_str();
            // Numbers compare by value: TOML writes 2.0 back as "2".
            let raw = |m: &clap::ArgMatches| {
                m.get_raw(id).map(|v| {
                    v.map(|s| {
                        let s = s.to_string_lossy().into_owned();
                        s.parse::<f64>().map(|f| f.to_string()).unwrap_or(s)
                    })
                    .collect::<Vec<_>>()
                })
            };
            assert_eq!(raw(&from_file), raw(&plain), "{id}");
        }
    }
}
