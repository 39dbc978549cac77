//! `--dump-after PASS|all DIR` for the `kiln` CLI (`kiln dump`, `kiln build`) and the
//! example: the IR text and DOT of the graph after the named pass of the pipeline, or
//! after every pass, as `NN-STAGE.kiln` and `NN-STAGE.dot` (stage 00 is `traced`).

use kiln_graph::Graph;
use std::path::{Path, PathBuf};

/// The traced graph followed by the graph after each pass of the default pipeline.
pub fn stages(traced: Graph) -> Result<Vec<(String, Graph)>, kiln_passes::PassError> {
    let out = kiln_passes::default_pipeline().keep_stages(true).run(traced.clone())?;
    let mut v = vec![("traced".to_string(), traced)];
    v.extend(out.stages.into_iter().map(|s| (s.pass.to_string(), s.graph)));
    Ok(v)
}

/// Checks a `--dump-after` name (`all`, `traced` or a pass of the pipeline, the default
/// one or, without fusion, canonicalization) before any work is done.
pub fn check_pass(which: &str, fusion: bool) -> Result<(), String> {
    let pipeline = if fusion { kiln_passes::default_pipeline() } else { kiln_passes::pipeline::canonicalize() };
    let names = pipeline.pass_names();
    if which == "all" || which == "traced" || names.contains(&which) {
        return Ok(());
    }
    Err(format!("--dump-after: no pass `{which}`; passes: all, traced, {}", names.join(", ")))
}

/// Writes `NN-STAGE.kiln` and `NN-STAGE.dot` for the selected stages into `dir` (made
/// if missing); returns the files written.
pub fn write_stages(stages: &[(String, Graph)], which: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    if which != "all" && !stages.iter().any(|(n, _)| n == which) {
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!("--dump-after: no pass `{which}`; passes: all, {}", names.join(", ")));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (i, (name, g)) in stages.iter().enumerate() {
        if which == "all" || which == name {
            for (ext, text) in
                [("kiln", kiln_graph::text::print(g)), ("dot", kiln_viz::dot::to_dot(g, &Default::default()))]
            {
                let path = dir.join(format!("{i:02}-{name}.{ext}"));
                std::fs::write(&path, text).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
                written.push(path);
            }
        }
    }
    Ok(written)
}
