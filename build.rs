//! Embeds every CUDA kernel source in the binary: `kernels/*.cu` become `KERNELS` (module name, source with
//! `kernels/prelude.cuh` prepended, FNV-1a hash of that text), so the NVRTC cache can key compiled code by
//! content and a changed kernel is recompiled.

use std::fmt::Write as _;
use std::path::Path;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let prelude = std::fs::read_to_string(dir.join("prelude.cuh")).expect("kernels/prelude.cuh");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("kernels/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    names.sort();
    let mut out = String::from("/// (module, source with the prelude, content hash), one per `kernels/*.cu`.\n");
    out += "pub const KERNELS: &[(&str, &str, u64)] = &[\n";
    for name in &names {
        println!("cargo:rerun-if-changed=kernels/{name}");
        let body = std::fs::read_to_string(dir.join(name)).expect("kernel source");
        let full = format!("{prelude}\n#line 1 \"{name}\"\n{body}");
        let module = name.trim_end_matches(".cu");
        writeln!(out, "    ({module:?}, {full:?}, 0x{:016x}),", fnv1a(full.as_bytes())).unwrap();
    }
    out += "];\n";
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernels.rs");
    std::fs::write(dest, out).expect("write kernels.rs");
}
