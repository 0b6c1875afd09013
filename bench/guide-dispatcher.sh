#!/bin/bash
# The libvirt qemu hook dispatcher that passthrough guides have people install as /etc/libvirt/hooks/qemu:
# for `qemu <vm> <operation> <sub-operation> <extra>` it runs every executable found at
# qemu.d/<vm>/<operation>/<sub-operation> (a file, or each file in that directory, in name order) with the
# hook's own arguments, and stops at the first failure so that libvirt refuses the start.
#
# Written for the benchmark (bench/run) as the best case of that design: bash builtins only. Popular
# versions also fork dirname(1) and find(1) on every call, so they cost more than this one.
set -e
shopt -s nullglob

hook_dir="${BASH_SOURCE[0]%/*}/qemu.d/$1/$2/$3"

if [[ -f "$hook_dir" && -x "$hook_dir" ]]; then
    "$hook_dir" "$@"
elif [[ -d "$hook_dir" ]]; then
    for script in "$hook_dir"/*; do
        if [[ -f "$script" && -x "$script" ]]; then
            "$script" "$@"
        fi
    done
fi
exit 0
