"""Tune LoRA fine-tuning of Qwen2.5 into a Vietnamese AMR parser with Ray Tune (Optuna + ASHA).

    python run_tune.py --model qwen2.5-7b --data-dir ../shared/data/vlsp2025
    python run_tune.py --model tiny --smoke-test                      # CPU, embedded local Ray (real models: the GPUs found)
    python run_tune.py --model qwen2.5-3b --preset full_training --no-search --data-dir ../shared/data/vlsp2025

On a cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python run_tune.py ...
Flags: python run_tune.py --help. The work lives in ray_mtup.launcher.
"""

from ray_mtup.launcher import main

if __name__ == "__main__":
    raise SystemExit(main())
