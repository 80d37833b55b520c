#!/usr/bin/env bash
# Shows that the CUDA tests under the driver stand-in can fail: plants one bug at a time in the CUDA backend's
# launch code, in a throwaway worktree of HEAD, and runs the tests that must catch it. Every mutation must make
# its tests fail; the script prints each result and exits non-zero if one survived. Not run in CI (a quarter of
# an hour or so on 2 cores); its output is recorded in docs/standin.md.
#
#   tools/mutate-cuda.sh            # every mutation
#   tools/mutate-cuda.sh 2          # only the second
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${TMPDIR:-/tmp}/asge-mutate-$$
NVRTC=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
export LD_LIBRARY_PATH=$NVRTC/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ASGE_DATA=${ASGE_DATA:-$root/data} ASGE_CUDA_STANDIN=1 ASGE_REQUIRE_STANDIN=1
export CARGO_TARGET_DIR=${ASGE_MUTATE_TARGET:-${TMPDIR:-/tmp}/asge-mutate-target}
git worktree add --detach "$work" HEAD >/dev/null
trap 'git -C "$root" worktree remove --force "$work" >/dev/null 2>&1 || true' EXIT

# Applies mutation N to the worktree and prints "name<TAB>cargo test arguments"; exits 3 past the last one.
mutate() {
  python3 - "$work" "$1" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
M = [
    ("c_in and c_out swapped in the f32 conv forward's launch",
     "src/ops/conv_goodness_fwd/cuda.rs",
     "ConvGoodnessFwdF32 { x, w, bias, taps: &*taps, y: &mut *ys, B: bb, Cin: ci, Cout: co,",
     "ConvGoodnessFwdF32 { x, w, bias, taps: &*taps, y: &mut *ys, B: bb, Cin: co, Cout: ci,",
     "--test cuda conv_fwd_and_wgrad_match_cpu"),
    ("the weight gradient's scratch split one element short (its partials overrun into the bias partials)",
     "src/ops/conv_goodness_wgrad/cuda.rs",
     "let (mut part_w, mut part_b) = part.split_at_mut(gz * s.c_out * k_part);",
     "let (mut part_w, mut part_b) = part.split_at_mut(gz * s.c_out * k_part - 1);",
     "--test cuda conv_fwd_and_wgrad_match_cpu"),
    ("the statistics readback no longer waits for the compute lane (its explicit events removed)",
     "src/backend/cuda/mod.rs",
     "wait_for_streams(&self.rb_stream, &rb.marks, &self.streams)?;",
     "let _ = &rb.marks;",
     "--test cuda a_vgg8_training_step_matches_cpu_and_repeats"),
    ("with 8 lanes, one activation buffer left out of cudarc's cross-stream event tracking",
     "src/backend/cuda/memory.rs",
     """    fn operand_uninit(&self, len: usize) -> Result<CudaBuf> {
        match self.precision {
            Precision::F32 => self.uninit(len),
            // SAFETY: as for uninit.
            Precision::F16 => {
                drv(unsafe { self.memory_stream().alloc::<half::f16>(len.max(1)) }, "alloc").map(CudaBuf::from)
            }
        }
    }""",
     """    fn operand_uninit(&self, len: usize) -> Result<CudaBuf> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let untracked = self.streams.len() > 1 && N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 2;
        if untracked {
            unsafe { self.ctx.disable_event_tracking() };
        }
        let r = match self.precision {
            Precision::F32 => self.uninit(len),
            Precision::F16 => drv(unsafe { self.memory_stream().alloc::<half::f16>(len.max(1)) }, "alloc").map(CudaBuf::from),
        };
        if untracked {
            unsafe { self.ctx.enable_event_tracking() };
        }
        r
    }""",
     "--test cuda_train a_stream_per_layer_under_random_delays_equals_one_stream"),
    ("the weight gradient reuses the forward's input copy without checking that the input is unchanged",
     "src/backend/cuda/layout.rs",
     "if reuse && scratch.x_from == Some(made_from)",
     "if reuse && scratch.x_from.map(|f| f.1) == Some(*s)",
     "--test cuda the_weight_gradient_reuses_the_forwards_input_copy_only_while_it_is_current"),
    ("the other streams no longer wait on a launched step graph (meet_after_graph's waits removed)",
     "src/backend/cuda/graph.rs",
     """        for s in self.side_streams() {
            drv(s.wait(&ev.after), "stream wait")?;
        }""",
     "        let _ = &ev.after;",
     "--test cuda standin_an_op_on_another_lane_waits_for_the_step_graph"),
    ("a captured layer output no longer hands its lane over (the next lane waits on the capture's fork)",
     "src/backend/cuda/graph.rs",
     """        drv(ev.hand_off[lane].record(&self.streams[lane]), "capture: record a hand-off")?;
        ev.latest = lane;""",
     "        let _ = (&mut ev, lane);",
     "--test cuda a_replayed_step_graph_equals_the_eager_steps"),
    ("the channels-last layer output stores every 8-channel group of a pixel at the slice's first",
     "kernels/layer_output.cu",
     "st16(out + ((long)b * hw + px) * C + c,",
     "st16(out + ((long)b * hw + px) * C + c0,",
     "--test cuda parity::layer_output"),
    ("a layer output stored channels-last but not marked so (the next layer copies it as if NCHW)",
     "src/ops/layer_output/cuda.rs",
     "be.mark_channels_last(out, [batch, c, ho, wo]);",
     "let _ = (ho, wo);",
     "--test cuda a_vgg8_training_step_matches_cpu_and_repeats"),
    ("a replayed step graph no longer sets its layer outputs' channels-last marks again",
     "src/backend/cuda/graph.rs",
     """            for (mark, shape) in marks {
                *mark.lock().unwrap() = Some(*shape);
            }""",
     "            let _ = marks;",
     "--test cuda a_replayed_step_graph_leaves_the_channels_last_marks_true"),
]
if n > len(M):
    sys.exit(3)
name, path, find, replace, tests = M[n - 1]
text = open(f"{work}/{path}").read()
if find not in text:
    sys.exit(f"mutation {n}: its target is not in {path} any more; update tools/mutate-cuda.sh")
open(f"{work}/{path}", "w").write(text.replace(find, replace, 1))
print(f"{name} ({path})\t{tests}")
PY
}

survived=0
for n in $(seq 1 20); do
  if [ $# -gt 0 ] && [ "$1" != "$n" ]; then continue; fi
  git -C "$work" checkout --quiet -- .
  set +e
  line=$(mutate "$n")
  rc=$?
  set -e
  [ $rc -eq 3 ] && break
  [ $rc -ne 0 ] && { echo "$line"; exit 2; }
  name=${line%%$'\t'*}
  tests=${line#*$'\t'}
  echo "== mutation $n: $name"
  start=$(date +%s)
  # A mutation that does not build proves nothing about the tests: that is the script's error, not a catch.
  # shellcheck disable=SC2086
  if ! (cd "$work" && cargo test --release $tests --no-run >"$work/mutation-$n.log" 2>&1); then
    echo "   DOES NOT BUILD: fix the mutation ($(grep -m1 -E '^error' "$work/mutation-$n.log"))"
    survived=$((survived + 1))
    continue
  fi
  # shellcheck disable=SC2086
  if (cd "$work" && cargo test --release $tests -- --include-ignored --exact >"$work/mutation-$n.log" 2>&1); then
    echo "   SURVIVED: cargo test $tests passed with the bug in place ($(($(date +%s) - start)) s)"
    survived=$((survived + 1))
  else
    why=$(grep -m1 -E "panicked at|^error" -A1 "$work/mutation-$n.log" | tr '\n' ' ' | cut -c1-240)
    # A failed `asge` run inside a test: its own error line says why.
    cause=$(grep -o -m1 -E "error: [^\"]{0,240}" "$work/mutation-$n.log" | head -1)
    [ -n "$cause" ] && why="$why ... $cause"
    echo "   caught by cargo test $tests ($(($(date +%s) - start)) s): $why"
  fi
done
if [ "$survived" -eq 0 ]; then echo "every mutation was caught"; else echo "$survived mutation(s) survived or did not build"; exit 1; fi
