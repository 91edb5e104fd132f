#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one call on a CUDA machine (the device tool's H200):
# the fused kernels against their PyTorch references, the GPU tests, then the lego training
# curve (benchmarks/lego.py).  Prints everything; copies the JSON records to $OUT when set.
#
# Needs (the machine's own Python with torch, triton, numpy, scipy, scikit-image, Pillow, pytest):
#   .data/lego   a copy of ../shared/data/lego (the sibling folder does not travel)
#   .whl/        wheels of what the image lacks, for its Python (3.12): pyzmq, xatlas,
#                fast-simplification, trimesh (the bunny's scans; pip download --only-binary=:all:
#                --python-version 3.12 ...)
# Run from the repository root:  bash benchmarks/gpu_suite.sh [lego budgets, default 10,60]
# (the device tool: FIT_IMPLICIT_COMMIT=<this checkout's commit> bash benchmarks/gpu_suite.sh ...)
# SECTIONS picks what runs (default all: "kernels tests lego mesh"; LEGO_ARGS adds lego.py options to
# "lego", e.g. "--save-renders /tmp/renders" for the error's split between edges and the rest); "mesh" fits lego for
# benchmarks/lego_mesh.py (radiance field 60 s, SDF 120 s; textured meshes with and without the
# texture refinement, scored on the GPU by rasterising, and into $OUT/mesh_* for the Cycles score here;
# MESH_SPECS="nerf:60" picks fits, MESH_ARGS adds lego_mesh.py fit options).
# "lego_sdf" (not in the default) times the SDF on lego (SDF_BUDGETS, default 120 s; SDF_ARGS adds
# lego.py options, e.g. "--set max_rays=131072");
# "captures" (not in the default) scores real captures (CAPTURE_SPECS; see there).
# "scene" (not in the default) fits issue 12's own scene (SCENE_SPECS, default "sdf:120"; "sdf:120:photos"
# without the passes; SCENE_ARGS).
# "profile" (not in the default) times and profiles training steps on lego (benchmarks/profile_step.py,
# PROFILE_METHODS, default "sdf"; PROFILE_ARGS adds its options, e.g. "--set max_rays=131072"; PROFILE_DATA,
# PROFILE_PLAIN: see there).
# "poses" (not in the default) refines perturbed lego cameras (POSE_SPECS "sigma:budgets", POSE_ARGS; held-out views
# scored aligned, and after 150 steps of test-time pose fitting, as BARF scores them).
# "points" (not in the default) fits SDFs to scanned analytic shapes and, where .data/bunny is carried, the
# Stanford bunny's range scans (POINTS_PRESET, POINTS_CASES, POINTS_ARGS; Open3D's
# screened Poisson, the anchor, is not on the device machine: run it here with benchmarks/points_vs_poisson.py).
# "startup" (not in the default) times a fresh `serve` from launch to listening and from Submit to the first
# preview of lego (benchmarks/first_preview.py --backend), with and without the warm-up.
# "warm" (not in the default) scores the warm starts (issue 18 item 3): lego with and without, the radiance
# field at WARM_BUDGETS (default 2,5,10,30,60 s), the SDF at WARM_SDF_BUDGETS (default 10,30,60 s)
# (benchmarks/warm_start.py).  "warm_train" (not in the default) meta-learns the standard presets' warm starts
# on the GPU (scripts/train_warm_starts.py; carry .data/random_scenes, made here by benchmarks/random_scenes.py;
# WARM_TRAIN_ARGS) into $OUT/warm_starts: copy them into backend/fields/warm_starts to ship them.
# "dynamic" (not in the default) fits issue 17's animated scene (see there; carry .data/dynamic).
# "image" (not in the default) fits a 512x512 photo with each encoding (benchmarks/image_fit.py, IMAGE_SECONDS,
# default 10; needs .data/images/flower_512.png, which image_fit.py makes here from ../shared/data).
# "sweep" (not in the default) trains lego once per variant for a fixed number of steps, the
# variants side by side on the one GPU (eager surface steps leave it mostly idle, so they share it
# well; steps, not seconds, keep them comparable): SWEEP="a=1 b=2;a=3" (';' between variants,
# '' = the defaults; a --option=VALUE token is passed to lego.py, e.g. --pose-noise=0.05), SWEEP_METHOD (default sdf), SWEEP_STEPS (default 3000), SWEEP_ARGS,
# SWEEP_PARALLEL (variants at a time, default 4; the others wait for the next wave); SWEEP_DATA another scene
# under .data (e.g. dynamic, with SWEEP_ARGS="--test .data/dynamic/transforms_test.json").
# "parallel" (not in the default; a machine of 2+ GPUs, nvidia-h200-x2 or larger) fits lego on every GPU
# at once (fit --gpus N, fitting/distributed.py) and on one, the same seconds (PARALLEL_SECONDS, default 60),
# held-out PSNR and steps of each (issue 20's speed-up: the same PSNR in less time, or more in the same);
# then one lego job alone and one a GPU at once on `serve --gpus all` (PARALLEL_JOB_STEPS, default 5000).
set -uo pipefail
BUDGETS="${1:-10,60}"
SECTIONS="${SECTIONS:-kernels tests lego mesh}"
OUT="${OUT:-/tmp/gpu_suite_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The project's import names without installing it: fit_implicit/{backend,shared,blender_addon}.
SITE="${GPU_SUITE_SITE:-/tmp/gpu_suite_site}"   # another folder lets two suites run side by side
rm -rf "$SITE" && mkdir -p "$SITE/fit_implicit"
for d in backend shared blender_addon; do ln -s "$PWD/$d" "$SITE/fit_implicit/$d"; done
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
echo "commit ${FIT_IMPLICIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} (set FIT_IMPLICIT_COMMIT where the tree travels without its history)"

status=0
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# Files come back up to 16 MB: a larger one is split into parts (join them with cat here).
split_large() { if [[ -f "$1" && $(stat -c %s "$1") -gt 15000000 ]]; then split -b 15000000 -d "$1" "$1.part" && rm "$1"; fi; }
if want kernels; then
    echo "== kernels against their references (benchmarks/check_kernels.py)"
    python3 benchmarks/check_kernels.py --device cuda || status=1
fi
if want tests; then
    echo "== GPU tests (the files that hold tests marked gpu; the others need Blender)"
    # also into $OUT/gpu_tests.log: a long call's printed tail would lose these lines
    python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/backend/test_triton_kernels.py \
        tests/backend/export/test_mesh.py tests/backend/export/test_marching_cubes.py \
        tests/backend/fitting/test_dynamic_fit.py tests/backend/fitting/test_camera_refine.py 2>&1 \
        | tee "$OUT/gpu_tests.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
if want lego; then
    echo "== lego: held-out PSNR against training time (benchmarks/lego.py, budgets $BUDGETS s)"
    python3 benchmarks/lego.py --data .data/lego --budgets "$BUDGETS" ${LEGO_ARGS:-} --out "$OUT/bench_lego.json" || status=1
fi
if want startup; then      # not in the default: issue 18's start-up target (first preview <= 2 s of the click)
    echo "== startup: a fresh serve, Submit to first preview (lego), with the warm-up and without"
    python3 benchmarks/first_preview.py --backend --data .data/lego --seconds 5 2>>"$OUT/startup.log" || status=1
    python3 benchmarks/first_preview.py --backend --data .data/lego --seconds 5 --serve=--no-warm-up \
        2>>"$OUT/startup.log" || status=1
    echo "== startup: where a fresh process's first seconds go (in process, after the two above)"
    python3 benchmarks/first_preview.py --data .data/lego --seconds 5 --breakdown 2>>"$OUT/startup.log" || status=1
fi
if want warm_train; then  # not in the default: the standard presets' warm starts, meta-learned on the GPU
    for method in nerf sdf; do
        echo "== warm start, $method, standard: meta-learning (scripts/train_warm_starts.py)"
        python3 scripts/train_warm_starts.py --scenes .data/random_scenes --method "$method" --preset standard \
            --device cuda --out "$OUT/warm_starts" ${WARM_TRAIN_ARGS:-} || status=1
    done
fi
if want warm; then        # not in the default: warm starts against PyTorch's initialisation (issue 18 item 3)
    echo "== warm starts: lego with and without (benchmarks/warm_start.py)"
    python3 benchmarks/warm_start.py --data .data/lego --budgets "${WARM_BUDGETS:-2,5,10,30,60}" \
        --out "$OUT/bench_warm_start.json" || status=1
    python3 benchmarks/warm_start.py --data .data/lego --method sdf --budgets "${WARM_SDF_BUDGETS:-10,30,60}" \
        --out "$OUT/bench_warm_start_sdf.json" || status=1
fi
if want lego_sdf; then     # not in the default: the SDF at a fixed time (issue 12's 34 dB target)
    echo "== lego, SDF: held-out PSNR against training time (benchmarks/lego.py --method sdf, budgets ${SDF_BUDGETS:-120} s)"
    python3 benchmarks/lego.py --data .data/lego --method sdf --budgets "${SDF_BUDGETS:-120}" ${SDF_ARGS:-} \
        --out "$OUT/bench_lego_sdf.json" || status=1
fi
if want captures; then      # not in the default: real captures (issue 15), each with and without the background model
    # CAPTURE_SPECS: folder under .data:method:budgets:background (auto|on|off)[:NAME=VALUE,...],
    # space-separated; carry the folders (".data/llff_flower", ".data/dtu_scan24": lego and both
    # pass the 64 MiB carry).
    for spec in ${CAPTURE_SPECS:-llff_flower/images_8:nerf:60,180:auto llff_flower/images_8:nerf:60:on:camera_refine=off llff_flower/images_8:nerf:60:off}; do
        IFS=: read -r folder method budgets bg extra <<< "$spec"
        sets=(--set "background=$bg"); for kv in ${extra//,/ }; do sets+=(--set "$kv"); done
        name="$(echo "$folder" | tr / _)_${method}_$bg${extra:+_${extra//[=,]/_}}"
        echo "== capture $folder, $method, background $bg ${extra}: held-out PSNR (benchmarks/lego.py, budgets $budgets s)"
        python3 benchmarks/lego.py --data ".data/$folder" --method "$method" --budgets "$budgets" "${sets[@]}" \
            --out "$OUT/bench_$name.json" || status=1
    done
fi
if want profile; then    # not in the default: where a step's time goes, and how busy the GPU is
    # PROFILE_DATA: another scene under .data (e.g. dynamic); PROFILE_PLAIN=1 times the plain PyTorch
    # hash grid beside the fused one (radiance fields)
    for method in ${PROFILE_METHODS:-sdf}; do
        echo "== profile: ${PROFILE_DATA:-lego}, $method (benchmarks/profile_step.py)"
        only=(--triton-only); [[ "${PROFILE_PLAIN:-0}" == 1 ]] && only=()
        python3 benchmarks/profile_step.py --data ".data/${PROFILE_DATA:-lego}" --method "$method" "${only[@]}" \
            ${PROFILE_ARGS:-} || status=1
    done
fi
if want poses; then      # not in the default: BARF's protocol on lego (issue 15): perturbed cameras refined while fitting
    for spec in ${POSE_SPECS:-0.15:180 0.05:180}; do     # sigma:budgets
        IFS=: read -r sigma budgets <<< "$spec"
        echo "== lego, cameras perturbed by sigma $sigma, refined (benchmarks/lego.py --pose-noise, budgets $budgets s)"
        python3 benchmarks/lego.py --data .data/lego --budgets "$budgets" --pose-noise "$sigma" --set camera_refine=on --refine-test-poses 150 \
            ${POSE_ARGS:-} --out "$OUT/bench_poses_$sigma.json" || status=1
        python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['results'][-1]; e = r.get('pose_error') or {}
print('cameras', r.get('pose_error_before', {}).get('rotation_deg'), '->', e.get('rotation_deg'), 'deg mean (worst',
      e.get('max_rotation_deg'), '), moved', r.get('camera_moved_deg'), '; held out aligned', r.get('psnr_aligned'),
      'dB, after test-time pose fitting', r.get('psnr_test_refined'), 'dB; levels in at', r.get('levels_in_at'))" \
            "$OUT/bench_poses_$sigma.json" || true
    done
fi
if want points; then      # not in the default: surfaces from scans (issue 16); screened Poisson runs on the CPU here, not there
    echo "== surfaces from points: analytic scans (benchmarks/points_vs_poisson.py --no-poisson, preset ${POINTS_PRESET:-standard})"
    cases="sphere,torus,rounded_box,thin_plate"
    [[ -f .data/bunny/bun.conf ]] && cases="$cases,bunny"       # the real scan, when carried (point_cases.py)
    python3 benchmarks/points_vs_poisson.py --device cuda --no-poisson --preset "${POINTS_PRESET:-standard}" \
        --cases "${POINTS_CASES:-$cases}" ${POINTS_ARGS:-} --out "$OUT/bench_points.json" || status=1
fi
if want image; then      # not in the default: the encodings on a natural image (issue 16 item 4)
    echo "== image fitting: each encoding on a 512x512 photo (benchmarks/image_fit.py, ${IMAGE_SECONDS:-10} s each)"
    python3 benchmarks/image_fit.py --device cuda --image .data/images/flower_512.png --seconds "${IMAGE_SECONDS:-10}" \
        ${IMAGE_ARGS:-} --out "$OUT/bench_image.json" || status=1
fi
if want dynamic; then     # not in the default: issue 17's animated scene (benchmarks/dynamic_scene.py render, made here with
    # bpy: carry ".data/dynamic"), held out at unseen instants against training time, then a 180 s fit's
    # mesh at every 10th frame against that frame's geometry (DYNAMIC_BUDGETS, DYNAMIC_METHOD, DYNAMIC_ARGS)
    echo "== animated scene: held-out views at unseen instants (benchmarks/lego.py --test, budgets ${DYNAMIC_BUDGETS:-10,30,60,180} s)"
    python3 benchmarks/lego.py --data .data/dynamic --test .data/dynamic/transforms_test.json --method "${DYNAMIC_METHOD:-nerf}" \
        --budgets "${DYNAMIC_BUDGETS:-10,30,60,180}" ${DYNAMIC_ARGS:-} --out "$OUT/bench_dynamic.json" || status=1
    echo "== animated scene: meshes over time against the ground truth (fit-implicit fit 180 s, dynamic_scene.py score)"
    rm -rf /tmp/dynamic_run
    python3 -m fit_implicit.backend fit .data/dynamic --out /tmp/dynamic_run --method "${DYNAMIC_METHOD:-nerf}" \
        --seconds 180 ${DYNAMIC_ARGS:-} && \
    python3 benchmarks/dynamic_scene.py score --data .data/dynamic --run /tmp/dynamic_run --every 10 \
        --out "$OUT/bench_dynamic_mesh.json" || status=1
fi
if want mesh; then
    echo "== lego textured mesh (benchmarks/lego_mesh.py fit; score the folders with its score command)"
    for spec in ${MESH_SPECS:-nerf:60 sdf:120}; do     # method:seconds
        set -- ${spec/:/ }
        python3 benchmarks/lego_mesh.py fit --data .data/lego --out "$OUT/mesh_$1" --method "$1" --seconds "$2" \
            --mesh-resolution 512 --texture-size 2048 --no-field-renders ${MESH_ARGS:-} || status=1
        for g in "$OUT/mesh_$1"/lego.glb "$OUT/mesh_$1"/refine_*/lego.glb; do split_large "$g"; done
    done
fi
if want scene; then     # not in the default: issue 12's own scene (thin parts, holes, letters) with Blender's passes
    # .data/still_life: rendered on a machine with bpy (the device has none):
    #   python benchmarks/surface_scene.py --scene still_life --out .data/still_life
    # carry ".data/still_life"; then, here, relight the .glb in Cycles (benchmarks/relight.py).
    echo "== own scene (still life): textured mesh, Chamfer/F-score (benchmarks/lego_mesh.py fit --passes --gt)"
    for spec in ${SCENE_SPECS:-sdf:120}; do      # method:seconds[:photos|materials]  (photos: the beauty renders alone,
        IFS=: read -r method seconds mode <<< "$spec"   # no passes: the "radiance baked into base colour" baseline;
        # materials: the same, then base colour, roughness, metallic and light estimated, SCENE_MATERIAL_STEPS)
        name="scene_$method${mode:+_$mode}"; passes=(--passes); [[ "$mode" == photos ]] && passes=()
        [[ "$mode" == materials ]] && passes=(--materials "${SCENE_MATERIAL_STEPS:-2000}")
        python3 benchmarks/lego_mesh.py fit --data .data/still_life --out "$OUT/$name" --method "$method" \
            --seconds "$seconds" "${passes[@]}" --gt .data/still_life/ground_truth.ply --mesh-resolution 512 \
            --texture-size 2048 --no-field-renders ${SCENE_ARGS:-} || status=1
        for g in "$OUT/$name"/lego.glb "$OUT/$name"/refine_*/lego.glb; do split_large "$g"; done
    done
fi
if want parallel; then     # not in the default: data-parallel fitting over every GPU (issue 20)
    gpus=$(nvidia-smi -L | wc -l)
    echo "== parallel: lego, ${PARALLEL_SECONDS:-60} s, 1 GPU then $gpus (fit --gpus; docs/benchmarks.md)"
    for n in 1 "$gpus"; do
        rm -rf "/tmp/parallel_$n"
        python3 -m fit_implicit.backend fit .data/lego --out "/tmp/parallel_$n" --preset standard --device cuda \
            --seconds "${PARALLEL_SECONDS:-60}" --holdout 8 --gpus "$n" --log-every 10 ${PARALLEL_ARGS:-} || status=1
        cp "/tmp/parallel_$n/run.json" "$OUT/parallel_$n.json" 2>/dev/null || true
    done
    echo "== parallel jobs: lego, one job alone, then $gpus at once on serve --gpus all (benchmarks/many_jobs.py)"
    python3 benchmarks/many_jobs.py --data .data/lego --jobs "$gpus" --steps "${PARALLEL_JOB_STEPS:-5000}" \
        --serve "--gpus all" 2>>"$OUT/many_jobs.log" || status=1
fi
if want sweep; then
    # Variants run in waves of SWEEP_PARALLEL (default 4) processes; each wave's results are printed
    # as soon as it ends (a command cut short keeps what finished); the per-variant records are
    # gathered into $OUT/sweep.json and the logs into $OUT/sweep_logs.txt (few files come back).
    echo "== sweep: ${SWEEP_DATA:-lego}, ${SWEEP_METHOD:-sdf}, ${SWEEP_STEPS:-3000} steps a variant (benchmarks/lego.py)"
    IFS=';' read -ra variants <<< "${SWEEP:-}"
    parallel=${SWEEP_PARALLEL:-4}
    for ((w = 0; w < ${#variants[@]}; w += parallel)); do
        for ((i = w; i < w + parallel && i < ${#variants[@]}; i++)); do
            # NAME=VALUE tokens are settings; --option=VALUE tokens go to lego.py as they are
            sets=(); for kv in ${variants[$i]}; do if [[ $kv == --* ]]; then sets+=("$kv"); else sets+=(--set "$kv"); fi; done
            python3 benchmarks/lego.py --data ".data/${SWEEP_DATA:-lego}" --method "${SWEEP_METHOD:-sdf}" --steps "${SWEEP_STEPS:-3000}" \
                "${sets[@]}" ${SWEEP_ARGS:-} --out "$OUT/sweep_$i.json" > "$OUT/sweep_$i.log" 2>&1 &
        done
        wait
        for ((i = w; i < w + parallel && i < ${#variants[@]}; i++)); do
            echo "-- variant $i: ${variants[$i]:-defaults}"; tail -n 3 "$OUT/sweep_$i.log"
        done
    done
    python3 - "$OUT" "${#variants[@]}" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
docs, logs = [], []
for i in range(n):
    f, log = out / f"sweep_{i}.json", out / f"sweep_{i}.log"
    docs.append(json.loads(f.read_text()) if f.exists() else None)
    logs.append(f"===== variant {i}\n" + (log.read_text() if log.exists() else "(no log)\n"))
    f.unlink(missing_ok=True); log.unlink(missing_ok=True)
(out / "sweep.json").write_text(json.dumps(docs, indent=1))
(out / "sweep_logs.txt").write_text("".join(logs))
print(f"{'#':>2} {'PSNR':>6} {'steps/s':>7} {'inv_s':>8}  settings")
for i, d in enumerate(docs):
    r = (d or {}).get("results", [{}])[0] if d else {}
    poses = (f"rotation {r['pose_error_before']['rotation_deg']} -> {r['pose_error']['rotation_deg']} deg "
             f"(worst {r['pose_error']['max_rotation_deg']}), aligned {r.get('psnr_aligned')} dB") if "pose_error" in r else ""
    print(f"{i:>2} {r.get('psnr', float('nan')):>6} {r.get('steps_per_s', '-'):>7} {r.get('inv_s') or '-':>8}  "
          f"{(d or {}).get('overrides', 'FAILED')} {r.get('psnr_by_render_steps', '')} {r.get('psnr_by_supersample') or ''} {poses} {r.get('motion') or ''}")
PY
fi

exit $status
