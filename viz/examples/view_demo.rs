//! Traces a small multi-layer toy transformer with the DSL and opens the graph viewer.
//!
//! ```text
//! cargo run -p kiln-viz --features viewer --example view_demo -- [--layers N]
//!     [--screenshot out.png] [--expand model.layers.0] [--select QUERY]
//!     [--dot out.dot] [--json out.json]
//! ```
//!
//! `--screenshot` (or `KILN_VIZ_SCREENSHOT`) saves a PNG of the window after the first
//! frames and exits; `tools/viz_screenshot.sh` runs it under Xvfb.

#[path = "../tests/common/mod.rs"]
mod common;

use kiln_viz::viewer::{run_with, ViewerOptions};
use std::path::PathBuf;

fn main() {
    let mut opts = ViewerOptions::from_env();
    let mut layers = 4usize;
    let mut dot_out = None;
    let mut json_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--layers" => layers = val().parse().expect("--layers takes a number"),
            "--screenshot" => opts.screenshot = Some(PathBuf::from(val())),
            "--expand" => opts.expand.push(val()),
            "--select" => opts.select = Some(val()),
            "--dot" => dot_out = Some(val()),
            "--json" => json_out = Some(val()),
            "-h" | "--help" => {
                println!(
                    "view_demo [--layers N] [--screenshot PNG] [--expand SCOPE] [--select QUERY] [--dot F] [--json F]"
                );
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let stages = vec![
        (format!("traced ({layers} layers)"), common::toy_transformer(layers)),
        ("traced (1 layer)".to_string(), common::toy_transformer(1)),
    ];
    if let Some(p) = dot_out {
        let dot = kiln_viz::dot::stages_to_dot(&stages[..1], &Default::default());
        std::fs::write(p, dot).expect("write DOT");
    }
    if let Some(p) = json_out {
        let json = kiln_viz::json::stages_to_json(&stages);
        std::fs::write(p, serde_json::to_string_pretty(&json).expect("JSON")).expect("write JSON");
    }
    if let Err(e) = run_with(stages, "kiln graph viewer — toy transformer", opts) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
