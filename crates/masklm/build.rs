//! With the `tch` feature, bake libtorch's library folder into every binary of this package
//! (the CLI, tests, examples) as an rpath, so `masklm --backend tch` runs without
//! LD_LIBRARY_PATH. torch-sys (`links = "tch"`) reports the folder it linked against as
//! DEP_TCH_LIBTORCH_LIB.

use std::path::Path;

#[path = "src/libtorch_version.rs"]
#[allow(dead_code)]
mod libtorch_version;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    // The version built against, for the run-time check that the loaded libtorch matches
    // (crates/masklm/src/backend.rs): a mismatched one crashes deep inside a kernel.
    let version = libtorch_version::libtorch_version(lib).unwrap_or_default();
    println!("cargo:rustc-env=MASKLM_LIBTORCH_VERSION={version}");
    // scripts/setup-libtorch.sh --cpu-only links against a folder of symlinks; the libraries'
    // own rpaths ($ORIGIN/...) only work from the real folder, so point at that one.
    let real = lib
        .join("libtorch_cpu.so")
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| lib.to_path_buf());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", real.display());
    // Nothing in our code calls into libtorch_cuda directly, so the default --as-needed would
    // drop it and libtorch would find no CUDA device. Keep it when the install has it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
