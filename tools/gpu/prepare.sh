#!/usr/bin/env bash
# Run HERE, on the build machine (no GPU needed), before a GPU run (issue #14 item 4):
# builds the CUDA release binary with tools/cuda.sh, strips and compresses it into
# target/gpu-carry/ (ignored by git), adds the diffusers wheel the GPU machine lacks and, when
# the parity tests can be pointed at a device (STORYGPT_TEST_DEVICE; see docs/BENCHMARKS.md,
# "GPU script"), the CUDA parity test executables that fit; checks that the working tree plus
# the carried folder stay under the device tool's 64 MiB; prints the `run` call to make.
#
#   tools/gpu/prepare.sh            # ~20 min on 2 cores the first time (nvcc), then incremental
#   SKIP_BUILD=1 tools/gpu/prepare.sh   # reuse target/cuda/release/storygpt-v as it is
#
# Then, in the session that has the GPU: the `run` tool with the printed command and carry list;
# tools/gpu/on-device.sh does the rest and writes summary.md / summary.json under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${GPU_CARRY:-target/gpu-carry}   # another folder only for dry runs: carry must name it
LIMIT=$((64 * 1024 * 1024))
TARGET=${CARGO_TARGET_DIR:-$PWD/target/cuda}
BIN=$TARGET/release/storygpt-v
# Parity tests worth carrying, most useful first (only built when they take STORYGPT_TEST_DEVICE).
TESTS=${GPU_TESTS:-unet_parity vae_parity llm_parity clip_parity mapper_parity fuse_parity bundle_import}
DIFFUSERS=${GPU_DIFFUSERS:-diffusers==0.42.1}

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== building the CUDA release binary (tools/cuda.sh; ~20 min on 2 cores when cold)" >&2
  tools/cuda.sh cargo build --release --locked -p storygpt-v --features cuda
fi
[ -x "$BIN" ] || { echo "prepare.sh: no $BIN (run without SKIP_BUILD)" >&2; exit 1; }

rm -rf "$CARRY" && mkdir -p "$CARRY"
echo "== stripping and compressing $BIN" >&2
strip -o "$CARRY/storygpt-v" "$BIN"
readelf -d "$CARRY/storygpt-v" | grep NEEDED >&2
xz -9e -T0 -c "$CARRY/storygpt-v" >"$CARRY/storygpt-v.xz"
ls -l "$BIN" "$CARRY/storygpt-v" "$CARRY/storygpt-v.xz" >&2
rm "$CARRY/storygpt-v"

echo "== the diffusers wheel (pure Python; the GPU machine has torch, transformers and the rest)" >&2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$CARRY" "$DIFFUSERS"

# What travels besides the carry: tracked files and untracked files git does not ignore.
tree_bytes() {
  { GIT_OPTIONAL_LOCKS=0 git ls-files -z --cached --others --exclude-standard \
      | xargs -0 stat -c %s 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }'
}
carry_bytes() { du -sb "$CARRY" | cut -f1; }
TREE=$(tree_bytes)

if grep -lq STORYGPT_TEST_DEVICE backend/models/tests/*.rs 2>/dev/null; then
  echo "== CUDA parity test executables: $TESTS" >&2
  args=(); for t in $TESTS; do args+=(--test "$t"); done
  exes=$(tools/cuda.sh cargo test --release --locked -p models --features cuda --no-run \
           --message-format=json "${args[@]}" \
         | python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
  mkdir -p "$CARRY/tests"
  # The tests find their fixtures through CARGO_MANIFEST_DIR, a path of this machine:
  # on-device.sh links it to the repository copy there.
  echo "$PWD" >"$CARRY/tests/source-root.txt"
  for t in $TESTS; do
    exe=$(awk -v t="$t" '$1 == t { print $2 }' <<<"$exes")
    [ -n "$exe" ] || { echo "   $t: not built" >&2; continue; }
    strip -o "$CARRY/tests/$t" "$exe" && xz -9e -T0 "$CARRY/tests/$t"
    if [ $((TREE + $(carry_bytes))) -gt $((LIMIT - 2 * 1024 * 1024)) ]; then
      rm "$CARRY/tests/$t.xz"; echo "   $t: left out (64 MiB limit)" >&2
    else
      echo "   $t: $(stat -c %s "$CARRY/tests/$t.xz") bytes" >&2
    fi
  done
else
  echo "== no CUDA test executables: the parity tests do not read STORYGPT_TEST_DEVICE yet (on-device.sh" >&2
  echo "   runs parity through \`storygpt-v component --device cuda\` instead)" >&2
fi

{
  echo "prepared $(date -u +%FT%TZ) on $(hostname)"
  echo "commit $(git rev-parse HEAD 2>/dev/null)$(GIT_OPTIONAL_LOCKS=0 git diff --quiet HEAD 2>/dev/null \
    || echo ' (with local changes)')"
  echo "binary $(stat -c %s "$BIN") bytes, built $(date -u -r "$BIN" +%FT%TZ)"
  echo "CUDA_COMPUTE_CAP ${CUDA_COMPUTE_CAP:-90}"
  (cd "$CARRY" && find . -type f ! -name manifest.txt -exec sha256sum {} +)
} >"$CARRY/manifest.txt"

CARRY_B=$(carry_bytes)
TOTAL=$((TREE + CARRY_B))
printf '== working tree %d + %s %d = %d bytes of %d (%d MiB to spare)\n' "$TREE" "$CARRY" "$CARRY_B" \
  "$TOTAL" "$LIMIT" $(((LIMIT - TOTAL) / 1024 / 1024)) >&2
if [ "$TOTAL" -gt "$LIMIT" ]; then
  echo "prepare.sh: over the device tool's 64 MiB: carry less (GPU_TESTS=...)" >&2
  exit 1
fi

cat <<EOF

Ready. In the session that has a GPU, call the device tool once:

  run  command:   bash tools/gpu/on-device.sh target/gpu-carry
       carry:     ["target/gpu-carry"]
       timeout_s: 560

on-device.sh stops itself after GPU_BUDGET_S (460 s) and writes under \$OUT: summary.md,
summary.json, on-device.log, results.tar.gz (every raw result), diffusers-frame.png and
ours-frame.png. Copy summary.md into docs/BENCHMARKS.md ("GPU script"), then give_back.
A shorter rerun of some parts: command "GPU_PARTS=parity GPU_BUDGET_S=200 bash tools/gpu/on-device.sh".
Training on the GPU (issue #12 item 6): command "GPU_BUDGET_S=530 bash tools/gpu/train_check.sh
target/gpu-carry", timeout_s 570; an older binary stripped and xz-compressed into
$CARRY/storygpt-v-base.xz adds its A/B of char-ldm and stage 2.
EOF
