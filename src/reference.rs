//! `docs/reference/command-line.md`, written from the command line's own definitions: every
//! flag and environment variable of every command in one table. A test checks that the file in
//! the repository is what the definitions make (`LOOM_UPDATE_DOCS=1` rewrites it).

use std::collections::BTreeMap;
use std::fmt::Write;

use clap::{Arg, Command};

/// Where the reference lives, from the workspace root.
pub const PATH: &str = "docs/reference/command-line.md";

/// One row: a flag with one meaning, and the commands that take it.
struct Row {
    env: Option<String>,
    default: Option<String>,
    help: String,
    commands: Vec<String>,
}

/// The reference of `root` (the `loom` command) as Markdown.
pub fn command_line(root: &Command) -> String {
    // Keyed by flag and meaning: `--read-models` means one thing to `serve`, another to
    // `projector`.
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    collect(root, "loom", &mut rows);
    let mut text = String::from(
        "# Command-line and environment reference\n\n\
         Generated from `loom`'s own definitions by `LOOM_UPDATE_DOCS=1 cargo nextest run \
         --workspace -E 'test(command_line_reference)'`; a test fails when this file is not \
         current. `loom <command> --help` says the same per command. A flag given on the command \
         line wins over its environment variable; flags marked *(global)* may follow any \
         command.\n\n\
         Environment variables that are not flags: `LOOM_MASTER_KEY` (64 hex digits: the key \
         that wraps the tenants' data keys and authenticates the log; default: \
         `<data dir>/master.key`, generated on first start), `LOOM_TEST_*` (the test suite's, \
         see docs/testing.md), and the AWS SDK's `AWS_*` for S3 credentials.\n\n\
         | Flag | Environment | Default | Commands | What it does |\n\
         |---|---|---|---|---|\n",
    );
    for ((flag, _), row) in rows {
        let _ = writeln!(
            text,
            "| `{flag}` | {} | {} | {} | {} |",
            row.env.map_or_else(String::new, |e| format!("`{e}`")),
            row.default.map_or_else(String::new, |d| format!("`{d}`")),
            row.commands.join(", "),
            row.help,
        );
    }
    text
}

fn collect(command: &Command, path: &str, rows: &mut BTreeMap<(String, String), Row>) {
    for arg in command.get_arguments() {
        if arg.is_hide_set() {
            continue;
        }
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(long), _) => format!("--{long}"),
            (None, Some(short)) => format!("-{short}"),
            (None, None) => format!("<{}>", arg.get_id()),
        };
        if flag == "--help" || flag == "--version" {
            continue;
        }
        let help = help(arg);
        let name = if arg.is_global_set() {
            format!("`{path}` *(global)*")
        } else {
            format!("`{path}`")
        };
        let row = rows.entry((flag, help.clone())).or_insert_with(|| Row {
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            default: default(arg),
            help,
            commands: Vec::new(),
        });
        row.commands.push(name);
    }
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        // Unbuilt, a subcommand holds only its own flags: global ones are listed once, where
        // they are declared.
        collect(sub, &format!("{path} {}", sub.get_name()), rows);
    }
}

/// The flag's help on one line, with its possible values, escaped for a table cell.
fn help(arg: &Arg) -> String {
    let mut help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(ToString::to_string)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    // Booleans' "true"/"false" say nothing.
    if !values.is_empty() && values != ["`true`", "`false`"] && !help.contains(&values[0]) {
        let _ = write!(help, " One of {}.", values.join(", "));
    }
    help.replace('|', "\\|")
}

fn default(arg: &Arg) -> Option<String> {
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    (!defaults.is_empty()).then(|| defaults.join(","))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_reference_is_current() {
        let text = command_line(&crate::Cli::command());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
        if std::env::var_os("LOOM_UPDATE_DOCS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == text,
            "{PATH} is not current: run `LOOM_UPDATE_DOCS=1 cargo nextest run --workspace -E \
             'test(command_line_reference)'` and commit it"
        );
        // Every flag with an environment variable is in it.
        for name in [
            "LOOM_SHUTDOWN_TIMEOUT",
            "LOOM_KAFKA_BROKERS",
            "LOOM_REGISTRATION",
        ] {
            assert!(text.contains(name), "{name}");
        }
    }

    /// The text of the function starting at `start` in `source`, up to its closing brace.
    fn body<'a>(source: &'a str, start: &str) -> &'a str {
        let at = source.find(start).unwrap();
        let end = source[at..].find("\n    }\n").unwrap();
        &source[at..at + end]
    }

    #[test]
    fn every_error_code_is_on_the_troubleshooting_page() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
        let quoted = regex::Regex::new(r#""([a-z_]+)""#).unwrap();
        let literal = regex::Regex::new(r#"error\(\s*StatusCode::\w+,\s*"([a-z_]+)""#).unwrap();
        let mut codes = std::collections::BTreeSet::new();
        let gateway = read("gateway/src/error.rs");
        let sql = read("query/src/sql.rs");
        for text in [
            body(&gateway, "pub fn code(&self)"),
            body(&gateway, "pub fn name(self)"),
            body(&sql, "pub fn code(&self)"),
        ] {
            codes.extend(quoted.captures_iter(text).map(|c| c[1].to_owned()));
        }
        for dir in ["query/src/http", "dashboard/src"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                codes.extend(literal.captures_iter(&text).map(|c| c[1].to_owned()));
            }
        }
        assert!(codes.len() > 40, "{codes:?}");
        let page = read("docs/troubleshooting.md");
        let missing: Vec<&String> = codes
            .iter()
            .filter(|code| !page.contains(&format!("`{code}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/troubleshooting.md: {missing:?}"
        );
    }

    fn sources(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }

    #[test]
    fn every_metric_is_in_the_observability_page() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in [
            "src",
            "gateway/src",
            "projector/src",
            "query/src",
            "dashboard/src",
            "schemas/src",
        ] {
            sources(&root.join(dir), &mut files);
        }
        let named =
            regex::Regex::new(r#"metrics::(?:counter|gauge|histogram)!\(\s*"(loom_[a-z_]+)""#)
                .unwrap();
        let mut metrics = std::collections::BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            metrics.extend(named.captures_iter(&text).map(|c| c[1].to_owned()));
        }
        assert!(metrics.len() > 40, "{metrics:?}");
        let page = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
        let missing: Vec<&String> = metrics
            .iter()
            .filter(|name| !page.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/observability.md: {missing:?}"
        );
    }
}
