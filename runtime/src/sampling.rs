//! Sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded.
