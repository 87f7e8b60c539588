//! The version of a libtorch installation, from its library folder: `torch/lib/../version.py`
//! (the PyPI wheel: `__version__ = '2.9.0+cu128'`) or `libtorch/lib/../build-version` (the
//! standalone zip: `2.9.0+cpu`). Shared by build.rs (the version built against) and the
//! libtorch backend (the version loaded at run time).

use std::path::Path;

/// `2.9.0+cu128` for the installation whose `lib` folder is `lib_dir`.
pub fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("__version__"))?;
        let value = line.split('=').nth(1)?.trim();
        return Some(value.trim_matches(|c| c == '\'' || c == '"').to_string());
    }
    let text = std::fs::read_to_string(root.join("build-version")).ok()?;
    Some(text.trim().to_string())
}

/// `major.minor` of a version string: libtorch's C++ ABI changes between minor releases.
pub fn major_minor(version: &str) -> &str {
    let mut dots = version.match_indices('.');
    match (dots.next(), dots.next()) {
        (Some(_), Some((second, _))) => &version[..second],
        _ => version.split('+').next().unwrap_or(version),
    }
}
