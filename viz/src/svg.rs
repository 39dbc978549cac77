//! SVG through Graphviz: `dot -Tsvg`, when it is installed.

use crate::VizError;
use std::io::Write;
use std::process::{Command, Stdio};

/// Renders DOT text (from [`crate::dot::to_dot`]) to SVG by running Graphviz `dot -Tsvg`.
/// Fails with [`VizError::GraphvizNotInstalled`] (whose message says how to install it)
/// when `dot` is not on `PATH`.
pub fn to_svg(dot: &str) -> Result<String, VizError> {
    to_svg_with("dot", dot)
}

/// As [`to_svg`], running the given Graphviz executable.
pub fn to_svg_with(program: &str, dot: &str) -> Result<String, VizError> {
    let mut child = match Command::new(program)
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(VizError::GraphvizNotInstalled),
        Err(e) => return Err(VizError::Io(e)),
    };
    // Feed stdin from a thread so a large graph cannot deadlock on full pipes.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = dot.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    // A write error (broken pipe) means dot exited early; its status and stderr say why.
    let _ = writer.join();
    if !out.status.success() {
        return Err(VizError::Graphviz {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    String::from_utf8(out.stdout)
        .map_err(|e| VizError::Graphviz { status: "ok".into(), stderr: format!("output is not UTF-8: {e}") })
}
