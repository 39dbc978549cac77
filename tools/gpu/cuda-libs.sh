# Sourced by the tools/gpu scripts on the GPU machine: puts the CUDA libraries on
# LD_LIBRARY_PATH (the toolkit's lib dirs, then the pip wheels' nvidia/*/lib), since
# cudarc loads libcuda, libnvrtc and libcublas at run time.
libdirs="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib"
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null || true)
if [ -n "$nv" ]; then libdirs="$libdirs $(ls -d "$nv"/*/lib 2>/dev/null | tr '\n' ' ')"; fi
for d in $libdirs; do
    [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
