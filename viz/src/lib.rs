//! # kiln-viz — seeing the graph
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-passes`.
