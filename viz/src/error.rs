use thiserror::Error;

/// Errors of the exporters and the viewer.
#[derive(Debug, Error)]
pub enum VizError {
    /// `dot` is not on `PATH`.
    #[error(
        "Graphviz is not installed (the `dot` program was not found on PATH); install it with \
         `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or from \
         https://graphviz.org/download/, or write DOT text instead of SVG"
    )]
    GraphvizNotInstalled,
    /// `dot` ran but failed.
    #[error("Graphviz `dot -Tsvg` failed ({status}): {stderr}")]
    Graphviz { status: String, stderr: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The viewer was given nothing to show.
    #[error("no stages to show: pass at least one (name, graph) pair")]
    NoStages,
    /// The window could not be opened or crashed.
    #[error("viewer failed: {0}")]
    Viewer(String),
}
