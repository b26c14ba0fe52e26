# Run-time environment for CPU machines (sourced by train.sh / test.sh). Must be set before triton/deepspeed import.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ -z "${WANDB_API_KEY:-}" ] && [ -z "${WANDB_MODE:-}" ]; then export WANDB_MODE=offline; fi
