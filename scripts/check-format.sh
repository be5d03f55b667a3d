#!/usr/bin/env bash
# The clang-format check STYLE.md promises ("Formatting"): every C, header
# and CUDA file is as clang-format writes it with .clang-format, except the
# files in tests/format-legacy.txt, formatted before the check existed
# (reformatting them whole would churn their history).  With BASE (a commit,
# e.g. the merge base with main), the lines changed since BASE are checked
# in those files too (git clang-format), so no new line goes in unformatted.
#
#   scripts/check-format.sh [BASE]
#   CLANG_FORMAT=...   the binary (default: clang-format)
#
# Exit 0 clean; 1 with the diff that would fix it; 77 without clang-format
# (ctest's format test then skips).
set -euo pipefail
cd "$(dirname "$0")/.."

cf=${CLANG_FORMAT:-clang-format}
if ! command -v "$cf" >/dev/null; then
    echo "check-format: $cf is not installed (scripts/deps.sh installs clang-format); skipped"
    exit 77
fi
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t files < <(git ls-files '*.c' '*.h' '*.cu')
else
    mapfile -t files < <(find . -path ./build\* -prune -o \( -name '*.c' -o -name '*.h' -o -name '*.cu' \) \
        -print | sed 's|^\./||' | sort)
fi
mapfile -t legacy < <(grep -v '^#' tests/format-legacy.txt | sed '/^\s*$/d')
bad=0
for f in "${files[@]}"; do
    skip=0
    for l in "${legacy[@]}"; do
        [ "$f" = "$l" ] && skip=1 && break
    done
    [ "$skip" = 1 ] && continue
    if ! "$cf" --dry-run -Werror "$f" >/dev/null 2>&1; then
        echo "check-format: $f is not as clang-format writes it:"
        diff -u "$f" <("$cf" "$f") | head -40 || true
        bad=1
    fi
done
if [ $# -ge 1 ]; then
    out=$(git clang-format --binary "$(command -v "$cf")" --diff "$1" -- "${legacy[@]}" 2>&1 || true)
    if ! echo "$out" | grep -qE '^(no modified files to format|clang-format did not modify any files)$' &&
        [ -n "$out" ]; then
        echo "check-format: lines changed since $1 in files of tests/format-legacy.txt:"
        echo "$out"
        bad=1
    fi
fi
[ "$bad" = 0 ] && echo "check-format: ok (${#files[@]} files, ${#legacy[@]} legacy)"
exit "$bad"
