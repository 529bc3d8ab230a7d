# gridtrain site environment: sourced by every batch script `gridtrain submit` renders (on the first
# node, before srun; srun passes the environment on to every rank). Copy it, adapt it to your
# cluster and pass the copy with `gridtrain submit --site-env PATH`. Everything here is optional: as
# shipped it changes nothing a site has not asked for.

# --- Software -------------------------------------------------------------------------------------
# Modules and the Python environment gridtrain is installed in (a path every node can see).
# module purge
# module load cuda/12.4 nccl/2.21
# source /shared/envs/gridtrain/bin/activate

# --- NCCL (GPU jobs) ------------------------------------------------------------------------------
# The network interface and InfiniBand HCAs NCCL should use; wrong values are the usual cause of a
# multi-node job hanging at start-up. NCCL_DEBUG=INFO prints which transport it picked.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
# export NCCL_DEBUG=WARN
# gridtrain itself sets CUDA_DEVICE_MAX_CONNECTIONS=1 and TORCH_NCCL_ASYNC_ERROR_HANDLING=1 for CUDA
# ranks (unless set here): ordered tensor-parallel communication and fail-fast NCCL errors.

# --- CPU threads ----------------------------------------------------------------------------------
# One thread per rank unless the site says otherwise (gridtrain's default for CPU ranks).
# export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --- Paths ----------------------------------------------------------------------------------------
# Node-local scratch for caches (dataset index caches, compiled kernels). Checkpoints must go to a
# filesystem every node sees: set checkpoint.dir (or train.run_dir) in the run config to a path under
# SHARED_CKPT_ROOT, because a requeued job may start on other nodes.
# export SCRATCH=${SCRATCH:-/scratch/$USER}
# export SHARED_CKPT_ROOT=/shared/checkpoints/$USER
# export TRITON_CACHE_DIR=$SCRATCH/triton-cache
# export HF_HOME=$SCRATCH/hf
