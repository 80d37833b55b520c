//! Many processes: the ranks a launcher starts, their rendezvous, NCCL between them and the faults, as a user
//! runs them (the real binary: `asge comm-check` here, `asge train` in dist/train.rs, data parallel, and
//! dist/layers.rs, layer parallel). In CI under the CUDA stand-in (ASGE_CUDA_STANDIN=1), whose NCCL
//! moves the data between the processes through shared memory (tests/emu/standin/nccl.inc); tools/test.sh runs
//! this binary alone, one test at a time. Every collective's result is checked exactly by comm-check itself
//! (sums of small integers: exact in f32 in any order).
#![cfg(feature = "cuda")]

mod common;
#[path = "dist/layers.rs"]
mod layers;
#[path = "dist/train.rs"]
mod train;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const STANDIN: &str = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)";

fn asge() -> Command {
    assert!(
        std::env::var("ASGE_CUDA_STANDIN").as_deref() == Ok("1"),
        "these tests run under the CUDA stand-in (ASGE_CUDA_STANDIN=1): tools/test.sh sets it"
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_asge"));
    // The launcher's variables of the test's own environment never leak into a rank.
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"] {
        c.env_remove(v);
    }
    c.env_remove("OMPI_COMM_WORLD_RANK").env_remove("ASGE_NCCL_STANDIN_KILL");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// Starts one rank with `vars` (the launcher's variables), waiting at most `timeout` seconds for the others.
fn rank(vars: &[(&str, String)], timeout: u64) -> std::process::Child {
    let mut c = asge();
    c.args(["--threads", "1", "comm-check", "--sizes", "1000,300000", "--iters", "2", "--timeout"]);
    c.arg(timeout.to_string());
    for (k, v) in vars {
        c.env(k, v);
    }
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn alone_the_library_loads_and_a_world_of_one_reduces() {
    let _ = STANDIN;
    let o = asge().args(["comm-check", "--sizes", "1000", "--iters", "2"]).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("NCCL: the asge CUDA stand-in's NCCL") && t.contains("comm-check: ok on 1 rank(s)"), "{t}");
    let o = asge().arg("info").output().unwrap();
    assert!(text(&o).contains("nccl: the asge CUDA stand-in's NCCL"), "{}", text(&o));
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn nproc_starts_two_and_three_ranks_whose_sums_and_sends_are_exact() {
    for n in ["2", "3"] {
        // 300,000 values: more than one round of the stand-in's 1 MiB slots.
        let o = asge()
            .args(["--threads", "2", "comm-check", "--nproc", n, "--sizes", "1000,300000", "--iters", "3"])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(o.status.success(), "--nproc {n}: {t}");
        assert!(t.contains(&format!("comm-check: ok on {n} rank(s)")), "{t}");
        assert!(t.contains("send/receive of 1000 f32 values around the ring: exact"), "{t}");
        assert!(t.contains("--nproc), rendezvous tcp:127.0.0.1:"), "{t}");
        // Only rank 0 prints.
        assert_eq!(t.matches("comm-check: ok").count(), 1, "{t}");
    }
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn slurm_open_mpi_and_torchrun_variables_make_ranks() {
    let port = free_port();
    let master = [("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.to_string())];
    let slurm = |r: usize| {
        let mut v = vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", "2".into()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_JOB_ID", format!("t{port}")),
        ];
        v.extend(master.clone());
        v
    };
    let mpi = |r: usize| {
        let mut v = vec![
            ("OMPI_COMM_WORLD_RANK", r.to_string()),
            ("OMPI_COMM_WORLD_SIZE", "2".into()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", r.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2".into()),
        ];
        v.extend(master.clone());
        v
    };
    // torchrun's own store holds MASTER_PORT: the ranks meet through a file named from its run id.
    let run_id = format!("asge-test-{}", std::process::id());
    let torch = |r: usize| {
        let mut v = vec![
            ("RANK", r.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_RANK", r.to_string()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("TORCHELASTIC_RUN_ID", run_id.clone()),
        ];
        v.extend(master.clone());
        v
    };
    for (name, vars, expect) in [
        ("Slurm", [slurm(0), slurm(1)], "2 rank(s) (Slurm), rendezvous tcp:127.0.0.1:"),
        ("Open MPI", [mpi(0), mpi(1)], "2 rank(s) (Open MPI), rendezvous tcp:127.0.0.1:"),
        ("torchrun", [torch(0), torch(1)], "2 rank(s) (torchrun), rendezvous file:"),
    ] {
        // Rank 1 first: it waits for rank 0.
        let r1 = rank(&vars[1], 60);
        std::thread::sleep(Duration::from_millis(300));
        let r0 = rank(&vars[0], 60);
        let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
        assert!(o0.status.success() && o1.status.success(), "{name}: rank 0: {}\nrank 1: {}", text(&o0), text(&o1));
        assert!(
            text(&o0).contains(expect) && text(&o0).contains("comm-check: ok on 2 rank(s)"),
            "{name}: {}",
            text(&o0)
        );
        assert!(!text(&o1).contains("comm-check: ok"), "{name}: rank 1 printed: {}", text(&o1));
    }
    // The rendezvous file is gone once every rank joined.
    let f = std::env::temp_dir().join(format!("asge-rendezvous-{run_id}-{port}"));
    assert!(!f.exists(), "{} left behind", f.display());
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_rank_killed_inside_a_collective_fails_the_others_naming_it() {
    let t0 = Instant::now();
    let o = asge()
        .args(["--threads", "2", "comm-check", "--nproc", "2", "--sizes", "1000,300000", "--iters", "3"])
        .args(["--timeout", "60"])
        .env("ASGE_NCCL_STANDIN_KILL", "1:3")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    // Rank 0 learns of it from the collective (the stand-in sees the peer's process gone), well before --timeout.
    assert!(t.contains("killing rank 1 in round 3"), "{t}");
    assert!(t.contains("rank 1 (pid") && t.contains("has exited"), "{t}");
    assert!(t.contains("rank 1 failed (exit code 137)"), "{t}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}: {t}", t0.elapsed());
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_rank_that_never_arrives_and_a_taken_port_are_errors_naming_them() {
    let port = free_port();
    let vars = |r: usize| {
        vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ]
    };
    let t0 = Instant::now();
    let o = rank(&vars(0), 3).wait_with_output().unwrap();
    assert!(!o.status.success() && text(&o).contains("rank(s) 1 never connected"), "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let o = rank(&vars(1), 2).wait_with_output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains(&format!("rank 0 did not answer on 127.0.0.1:{port}")), "{t}");
    assert!(t.contains("error: rank 1: "), "{t}");
    // Another program holds the port.
    let held = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    let o = rank(&vars(0), 3).wait_with_output().unwrap();
    assert!(!o.status.success() && text(&o).contains(&format!("cannot listen on port {port}")), "{}", text(&o));
    drop(held);
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn bad_launcher_variables_are_named() {
    for (vars, want) in [
        (vec![("RANK", "2"), ("WORLD_SIZE", "2")], "rank 2 of a world of 2"),
        (vec![("RANK", "0")], "RANK but not WORLD_SIZE"),
        (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\" is not a whole number"),
        (vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "0")], "MASTER_PORT=0"),
        (vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")], "MASTER_ADDR and MASTER_PORT are not set"),
    ] {
        let mut c = asge();
        c.args(["comm-check", "--timeout", "2"]);
        for (k, v) in &vars {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success() && text(&o).contains(want), "{vars:?}: {}", text(&o));
    }
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn torchrun_no_python_starts_the_ranks() {
    // PyTorch as tools/test.sh installs it for the interop tests (torch 2.15.0): its torchrun, in standalone
    // mode (its own store on a free port), runs the binary itself.
    let torch = std::env::var("ASGE_TORCH").expect("ASGE_TORCH: the folder tools/test.sh installs PyTorch into");
    let _ = asge(); // the stand-in check
    let o = Command::new("python3")
        .args(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_asge"))
        .args(["comm-check", "--sizes", "1000,300000", "--iters", "2", "--timeout", "60"])
        .env("PYTHONPATH", torch)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("2 rank(s) (torchrun), rendezvous file:") && t.contains("comm-check: ok on 2 rank(s)"), "{t}");
}
