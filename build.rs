//! Build-time work on `kernels/*.cu`, the one source of truth for every kernel:
//!
//! 1. `KERNELS` (module name, source with `kernels/prelude.cuh` prepended, FNV-1a hash of that text), so the
//!    NVRTC cache can key compiled code by content and a changed kernel is recompiled.
//! 2. From each `extern "C" __global__` signature (its parameters' C++ types and names, and the extent comment
//!    after each pointer, `/*[expr]*/` or `/*[expr]?*/` for one that may be null): the Rust launch wrapper of
//!    the kernel (`launch.rs`: one struct per kernel whose fields are the parameters, in order, typed from the
//!    C++ types), and the CUDA driver stand-in's table of host twins (`standin_kernels.inc`: each kernel bound to
//!    its host build, with the extents it reads and writes for the launch's arguments).
//! 3. `kernel_abi.cuh`, from `src/kernel_abi.rs` (the constants and `#[repr(C)]` structs Rust and the kernels
//!    share): put before the prelude in every kernel's source, and included by the stand-in and the host build.
//! 4. The host emulation's launch entry points and their Rust types (`emu_launch.inc`, `emu_launch.rs`), for
//!    tests/kernel_emulation.rs.
//! 5. With the `cuda` feature and a C++17 compiler: the driver stand-in (`tests/emu/standin.cpp`, SONAME
//!    `libcuda.so.1`), embedded in the binary and loaded only with `ASGE_CUDA_STANDIN=1`. Without a compiler
//!    the build goes on without it (a warning; `ASGE_REQUIRE_STANDIN=1` makes that an error).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// One kernel parameter: its C++ type as written (without `__restrict__`), name, and for a pointer the pointee
/// type, constness and extent.
struct Param {
    ty: String,
    name: String,
    pointee: Option<String>,
    is_const: bool,
    extent: Option<String>,
    nullable: bool,
}

struct Kernel {
    name: String,
    file: String,
    params: Vec<Param>,
    /// Threads per block: its `__launch_bounds__`, else the backend's 256.
    block: u32,
}

/// The `extern "C" __global__` kernels of `src` (file `file`).
fn parse_kernels(file: &str, src: &str) -> Vec<Kernel> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__ void") {
        rest = &rest[i + "extern \"C\" __global__ void".len()..];
        let mut tail = rest.trim_start();
        let mut block = 256;
        if let Some(t) = tail.strip_prefix("__launch_bounds__(") {
            let close = t.find(')').expect("launch bounds close");
            block = t[..close].split(',').next().unwrap().trim().parse().expect("launch bounds: a number of threads");
            tail = t[close + 1..].trim_start();
        }
        let open = tail.find('(').expect("a parameter list");
        let name = tail[..open].trim().to_string();
        let close = tail[open..].find(')').map(|c| open + c).expect("a parameter list ends");
        // Find the matching ')' (extent comments hold parentheses).
        let body = &tail[open + 1..];
        let mut depth = 0i32;
        let mut in_comment = false;
        let mut end = close - open - 1;
        let bytes = body.as_bytes();
        let mut k = 0;
        while k < bytes.len() {
            if !in_comment && body[k..].starts_with("/*") {
                in_comment = true;
                k += 2;
                continue;
            }
            if in_comment {
                if body[k..].starts_with("*/") {
                    in_comment = false;
                    k += 2;
                } else {
                    k += 1;
                }
                continue;
            }
            match bytes[k] {
                b'(' => depth += 1,
                b')' if depth == 0 => {
                    end = k;
                    break;
                }
                b')' => depth -= 1,
                _ => {}
            }
            k += 1;
        }
        let list = &body[..end];
        // Split at commas outside comments.
        let mut parts = Vec::new();
        let (mut cur, mut in_c) = (String::new(), false);
        let lb = list.as_bytes();
        let mut j = 0;
        while j < lb.len() {
            if !in_c && list[j..].starts_with("/*") {
                in_c = true;
            } else if in_c && list[j..].starts_with("*/") {
                in_c = false;
                cur.push_str("*/");
                j += 2;
                continue;
            }
            if !in_c && lb[j] == b',' {
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(lb[j] as char);
            }
            j += 1;
        }
        if !cur.trim().is_empty() {
            parts.push(cur);
        }
        let params = parts
            .iter()
            .map(|p| {
                let (decl, extent) = match p.find("/*[") {
                    Some(c) => {
                        let e = &p[c + 3..p.rfind("*/").expect("an extent comment ends")];
                        (p[..c].trim().to_string(), Some(e.trim().to_string()))
                    }
                    None => (p.trim().to_string(), None),
                };
                let decl = decl.replace("__restrict__", "");
                let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
                let split = decl.rfind([' ', '*']).expect("a parameter name");
                let name = decl[split + 1..].to_string();
                let ty = decl[..=split].trim().to_string();
                let pointer = ty.ends_with('*');
                let is_const = ty.starts_with("const ");
                let pointee =
                    pointer.then(|| ty.trim_end_matches('*').trim().trim_start_matches("const ").trim().to_string());
                let (extent, nullable) = match extent {
                    Some(e) => {
                        let e = e.trim_end_matches('?').trim_end_matches(']').to_string();
                        let nullable = p.contains("]?*/");
                        (Some(e), nullable)
                    }
                    None => (None, false),
                };
                if pointer && extent.is_none() {
                    panic!("kernels/{file}: {name}: pointer parameter `{}` has no /*[extent]*/ comment", name);
                }
                Param { ty, name, pointee, is_const, extent, nullable }
            })
            .collect();
        out.push(Kernel { name, file: file.to_string(), params, block });
    }
    out
}

/// `kernel_abi.cuh` from the text of `src/kernel_abi.rs`, and the names of its structs: `#define NAME value` per
/// `pub const NAME: f32 | usize = literal;` (an f32 printed so that it parses back to the same bits), and per
/// `#[repr(C)]` struct of `f32` fields the C struct with the fields in the same order (the same layout).
fn kernel_abi(src: &str) -> (String, Vec<String>) {
    let mut h = String::from(
        "// Generated by build.rs from src/kernel_abi.rs: do not edit.\n#ifndef ASGE_KERNEL_ABI\n#define ASGE_KERNEL_ABI\n",
    );
    let mut structs = Vec::new();
    let mut lines = src.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if let Some(rest) = l.strip_prefix("pub const ") {
            let (name, rest) = rest.split_once(':').expect("kernel_abi.rs: `pub const NAME: TYPE = value;`");
            let (ty, value) = rest.split_once('=').expect("kernel_abi.rs: a constant's value");
            let value = value.trim().trim_end_matches(';').replace('_', "");
            match ty.trim() {
                "f32" => {
                    let v: f32 = value.parse().unwrap_or_else(|e| panic!("kernel_abi.rs: {name} = {value}: {e}"));
                    writeln!(h, "#define {name} {v:e}f").unwrap();
                }
                "usize" => {
                    let v: u32 = value.parse().unwrap_or_else(|e| panic!("kernel_abi.rs: {name} = {value}: {e}"));
                    writeln!(h, "#define {name} {v}").unwrap();
                }
                other => panic!("kernel_abi.rs: {name}: type {other} (f32 or usize only)"),
            }
        } else if l == "#[repr(C)]" {
            let decl = lines.find(|l| l.starts_with("pub struct ")).expect("kernel_abi.rs: a struct after #[repr(C)]");
            let name = decl["pub struct ".len()..].trim_end_matches('{').trim().to_string();
            writeln!(h, "struct {name} {{").unwrap();
            for f in lines.by_ref().take_while(|l| *l != "}").filter(|l| l.starts_with("pub ")) {
                let (field, ty) = f["pub ".len()..].split_once(':').expect("kernel_abi.rs: `pub field: f32,`");
                assert_eq!(ty.trim(), "f32,", "kernel_abi.rs: {name}.{field}: f32 fields only");
                writeln!(h, "    float {field};").unwrap();
            }
            h += "};\n";
            structs.push(name);
        }
    }
    h += "#endif\n";
    (h, structs)
}

/// The Rust type of a C++ scalar or pointee type (a struct of `src/kernel_abi.rs` by its own name).
fn rust_type(c: &str, kernel: &str, structs: &[String]) -> String {
    if structs.iter().any(|s| s == c) {
        return format!("crate::kernel_abi::{c}");
    }
    let t = match c {
        "int" => "i32",
        "unsigned" | "unsigned int" => "u32",
        "unsigned short" => "u16",
        "float" => "f32",
        "unsigned long long" => "u64",
        "long long" => "i64",
        "f16_bits" => "half::f16",
        other => panic!("kernel {kernel}: no Rust type for C++ type `{other}`"),
    };
    t.to_string()
}

fn camel(name: &str) -> String {
    name.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// `launch.rs`: per kernel, a struct of its parameters and `launch`, which pushes them in the signature's order.
fn rust_launchers(kernels: &[Kernel], structs: &[String]) -> String {
    let mut s = String::from(
        "// Generated by build.rs from the signatures in kernels/*.cu: do not edit.\n\
         use super::{DevIn, DevOut};\n\
         use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};\n\n",
    );
    for k in kernels {
        let ty = camel(&k.name);
        writeln!(s, "/// `{}` (kernels/{}): its parameters, in the order of its signature.", k.name, k.file).unwrap();
        writeln!(s, "#[allow(non_snake_case)]\npub struct {ty}<'a> {{").unwrap();
        for p in &k.params {
            match &p.pointee {
                Some(t) => {
                    let rt = rust_type(t, &k.name, structs);
                    let tr = if p.is_const { "DevIn" } else { "DevOut" };
                    let r = if p.is_const { "&'a dyn" } else { "&'a mut dyn" };
                    let extent = p.extent.as_deref().unwrap_or("");
                    writeln!(
                        s,
                        "    /// `{} {}`, `[{extent}]`{}",
                        p.ty,
                        p.name,
                        if p.nullable { " or null" } else { "" }
                    )
                    .unwrap();
                    if p.nullable {
                        writeln!(s, "    pub {}: Option<{r} {tr}<{rt}>>,", p.name).unwrap();
                    } else {
                        writeln!(s, "    pub {}: {r} {tr}<{rt}>,", p.name).unwrap();
                    }
                }
                None => writeln!(s, "    pub {}: {},", p.name, rust_type(&p.ty, &k.name, structs)).unwrap(),
            }
        }
        writeln!(s, "}}\n").unwrap();
        writeln!(s, "impl {ty}<'_> {{").unwrap();
        writeln!(s, "    pub const NAME: &'static str = {:?};", k.name).unwrap();
        writeln!(s, "    /// Launches the kernel on `stream` with these arguments.").unwrap();
        writeln!(s, "    ///\n    /// # Safety\n    /// The buffers must hold the extents the fields state for this launch's shape and grid.").unwrap();
        writeln!(
            s,
            "    pub unsafe fn launch(self, stream: &CudaStream, f: &CudaFunction, cfg: LaunchConfig) -> Result<(), cudarc::driver::DriverError> {{"
        )
        .unwrap();
        writeln!(s, "        #[allow(unused_mut, non_snake_case)]\n        let mut this = self;").unwrap();
        writeln!(s, "        let mut l = stream.launch_builder(f);").unwrap();
        for p in &k.params {
            match (&p.pointee, p.is_const, p.nullable) {
                (Some(_), true, false) => writeln!(s, "        this.{}.push(&mut l);", p.name).unwrap(),
                (Some(_), false, false) => writeln!(s, "        this.{}.push_mut(&mut l);", p.name).unwrap(),
                (Some(_), true, true) => writeln!(
                    s,
                    "        match this.{0} {{ Some(b) => b.push(&mut l), None => {{ l.arg(&super::NULL); }} }}",
                    p.name
                )
                .unwrap(),
                (Some(_), false, true) => writeln!(
                    s,
                    "        match this.{0}.take() {{ Some(b) => b.push_mut(&mut l), None => {{ l.arg(&super::NULL); }} }}",
                    p.name
                )
                .unwrap(),
                (None, _, _) => writeln!(s, "        l.arg(&this.{});", p.name).unwrap(),
            }
        }
        writeln!(s, "        unsafe {{ l.launch(cfg) }}.map(|_| ())\n    }}\n}}\n").unwrap();
    }
    s += "/// Every kernel's name and parameters (C++ type, name), from its signature.\n";
    s += "pub const SIGNATURES: &[(&str, &[(&str, &str)])] = &[\n";
    for k in kernels {
        let ps: Vec<String> = k.params.iter().map(|p| format!("({:?}, {:?})", p.ty, p.name)).collect();
        writeln!(s, "    ({:?}, &[{}]),", k.name, ps.join(", ")).unwrap();
    }
    s += "];\n";
    s
}

/// `standin_kernels.inc`: the kernel sources, and per kernel its host twin with the extents of its pointers.
fn standin_table(kernels: &[Kernel], files: &[PathBuf]) -> String {
    let mut s = String::from("// Generated by build.rs from the signatures in kernels/*.cu: do not edit.\n");
    for f in files {
        writeln!(s, "#include {:?}", f.display().to_string()).unwrap();
    }
    s += "\nnamespace standin_gen {\n";
    for k in kernels {
        writeln!(s, "// {} (kernels/{})", k.name, k.file).unwrap();
        writeln!(s, "static void extents_{}(void** args, const dim3& gridDim, standin::Extent* e) {{", k.name).unwrap();
        for (i, p) in k.params.iter().enumerate() {
            if p.pointee.is_none() {
                // Integers widened to 64 bits, so that an extent never overflows the kernel's own int type.
                let wide = if matches!(p.ty.as_str(), "float" | "double") { p.ty.as_str() } else { "long long" };
                writeln!(s, "    const {wide} {} = (const {wide})*static_cast<const {}*>(args[{i}]);", p.name, p.ty)
                    .unwrap();
            }
        }
        s += "    (void)gridDim;\n";
        let mut n = 0;
        for (i, p) in k.params.iter().enumerate() {
            if let (Some(t), Some(ext)) = (&p.pointee, &p.extent) {
                writeln!(
                    s,
                    "    e[{n}] = standin::Extent{{{i}, {:?}, (long long)({ext}) * (long long)sizeof({t}), {}, {}}};",
                    p.name, !p.is_const, p.nullable
                )
                .unwrap();
                n += 1;
            }
        }
        writeln!(s, "}}").unwrap();
    }
    s += "}  // namespace standin_gen\n\n";
    s += "static const standin::KernelEntry STANDIN_KERNELS[] = {\n";
    for k in kernels {
        let n = k.params.iter().filter(|p| p.pointee.is_some()).count();
        writeln!(s, "    standin::entry({0:?}, &{0}, &standin_gen::extents_{0}, {n}),", k.name).unwrap();
    }
    s += "};\n";
    s
}

/// The host emulation's entry points (tests/kernel_emulation.rs): `emu_launch.inc`, per kernel a C function
/// `emu_<kernel>(gx, gy, gz, <its parameters>)` that runs it over that grid with its block size (included by
/// tests/emu/launch.cpp), and `emu_launch.rs`, per kernel the Rust type of that function (from the same parsed
/// signature, so a test's launch is typed by the kernel's own parameters).
fn emulation_launches(kernels: &[Kernel], structs: &[String]) -> (String, String) {
    let mut c =
        String::from("// Generated by build.rs from the signatures in kernels/*.cu: do not edit.\nextern \"C\" {\n");
    let mut r = String::from("// Generated by build.rs from the signatures in kernels/*.cu: do not edit.\n");
    for k in kernels {
        let decl: Vec<String> = k.params.iter().map(|p| format!("{} {}", p.ty, p.name)).collect();
        let names: Vec<&str> = k.params.iter().map(|p| p.name.as_str()).collect();
        writeln!(
            c,
            "void emu_{0}(unsigned gx, unsigned gy, unsigned gz, {1}) {{\n    emu::launch(dim3{{gx, gy, gz}}, {2}, [&] {{ {0}({3}); }}, next_smem());\n}}",
            k.name,
            decl.join(", "),
            k.block,
            names.join(", ")
        )
        .unwrap();
        let types: Vec<String> = k
            .params
            .iter()
            .map(|p| match &p.pointee {
                // fp16 values travel as their bits.
                Some(t) => {
                    let rt = if t == "f16_bits" { "u16".to_string() } else { rust_type(t, &k.name, structs) };
                    let rt = rt.replace("crate::", "asge::");
                    format!("{} {rt}", if p.is_const { "*const" } else { "*mut" })
                }
                None => rust_type(&p.ty, &k.name, structs),
            })
            .collect();
        writeln!(r, "/// `emu_{}` (kernels/{}): grid x, y, z, then the kernel's parameters.", k.name, k.file).unwrap();
        writeln!(
            r,
            "#[allow(non_camel_case_types)]\npub type {} = unsafe extern \"C\" fn(u32, u32, u32, {});",
            k.name,
            types.join(", ")
        )
        .unwrap();
    }
    c += "}\n";
    (c, r)
}

/// Compiles the driver stand-in into `out/libcuda-standin.so`; false (with a warning) without a compiler.
fn build_standin(out: &Path, inc: &Path) -> bool {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let lib = out.join("libcuda-standin.so");
    let status = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-g0", "-shared", "-fPIC", "-fno-strict-aliasing", "-pthread"])
        .args(["-Wall", "-Wno-unused-function", "-Wno-unused-variable", "-Wno-unused-but-set-variable"])
        .args(["-Wno-unknown-pragmas", "-Wno-sign-compare", "-fvisibility=hidden"])
        .arg("-Wl,-soname,libcuda.so.1")
        .arg(format!("-DSTANDIN_KERNELS_INC=\"{}\"", inc.display()))
        .arg("-o")
        .arg(&lib)
        .arg("tests/emu/standin.cpp")
        .status();
    let required = std::env::var("ASGE_REQUIRE_STANDIN").is_ok_and(|v| v == "1");
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            if required {
                panic!("the CUDA driver stand-in (tests/emu/standin.cpp) did not compile with {cxx} ({s})");
            }
            println!("cargo:warning=the CUDA driver stand-in did not compile with {cxx} ({s}); ASGE_CUDA_STANDIN=1 will be an error");
            false
        }
        Err(e) => {
            if required {
                panic!("no C++ compiler `{cxx}` for the CUDA driver stand-in: {e}");
            }
            println!("cargo:warning=no C++ compiler `{cxx}` ({e}): this build has no CUDA driver stand-in");
            false
        }
    }
}

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=tests/emu");
    println!("cargo:rerun-if-changed=src/kernel_abi.rs");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-env-changed=ASGE_REQUIRE_STANDIN");
    println!("cargo::rustc-check-cfg=cfg(asge_standin)");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let (abi, structs) = kernel_abi(&std::fs::read_to_string("src/kernel_abi.rs").expect("src/kernel_abi.rs"));
    let abi_path = out_dir.join("kernel_abi.cuh");
    std::fs::write(&abi_path, &abi).expect("write kernel_abi.cuh");
    let prelude = abi + &std::fs::read_to_string(dir.join("prelude.cuh")).expect("kernels/prelude.cuh");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("kernels/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    names.sort();
    let mut out = String::from("/// (module, source with the prelude, content hash), one per `kernels/*.cu`.\n");
    out += "pub const KERNELS: &[(&str, &str, u64)] = &[\n";
    let mut kernels = Vec::new();
    let root = std::fs::canonicalize(".").unwrap();
    let mut files = vec![abi_path, root.join("kernels/prelude.cuh")];
    for name in &names {
        println!("cargo:rerun-if-changed=kernels/{name}");
        let body = std::fs::read_to_string(dir.join(name)).expect("kernel source");
        kernels.extend(parse_kernels(name, &body));
        files.push(root.join("kernels").join(name));
        let full = format!("{prelude}\n#line 1 \"{name}\"\n{body}");
        let module = name.trim_end_matches(".cu");
        writeln!(out, "    ({module:?}, {full:?}, 0x{:016x}),", fnv1a(full.as_bytes())).unwrap();
    }
    out += "];\n";
    std::fs::write(out_dir.join("kernels.rs"), out).expect("write kernels.rs");
    std::fs::write(out_dir.join("launch.rs"), rust_launchers(&kernels, &structs)).expect("write launch.rs");
    let (emu_c, emu_rs) = emulation_launches(&kernels, &structs);
    std::fs::write(out_dir.join("emu_launch.inc"), emu_c).expect("write emu_launch.inc");
    std::fs::write(out_dir.join("emu_launch.rs"), emu_rs).expect("write emu_launch.rs");
    let inc = out_dir.join("standin_kernels.inc");
    std::fs::write(&inc, standin_table(&kernels, &files)).expect("write standin_kernels.inc");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() && linux && build_standin(&out_dir, &inc) {
        println!("cargo:rustc-cfg=asge_standin");
    }
}
