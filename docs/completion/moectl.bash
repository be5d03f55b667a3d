# bash completion for moectl(1): its commands, each command's flags, and the
# values of the flags that take a fixed set.  Installed as
# share/bash-completion/completions/moectl, loaded on demand by
# bash-completion; or `source` it.

_moectl()
{
    local cur prev cmd i
    local commands="gen-model inspect forward gen-trace cache-sim trace pack verify status models
        stats load unload pin unpin evict retry record drain resume placement peer bench top"
    local remote="--remote --socket --tls --tls-ca --tls-cert --tls-key --token --timeout --json"
    local flags

    COMPREPLY=()
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
    if ((COMP_CWORD <= 1)); then
        COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur"))
        return 0
    fi
    cmd=${COMP_WORDS[1]}

    # The value of a flag.
    case $prev in
    --arch)
        COMPREPLY=($(compgen -W "mixtral qwen2_moe qwen3_moe qwen3_next qwen3_5_moe olmoe
            deepseek_v3 deepseek_v2 kimi_k2 glm4_moe llama4_text gpt_oss" -- "$cur"))
        return 0 ;;
    --dtype)
        COMPREPLY=($(compgen -W "bf16 f16 f32 fp8 mxfp4" -- "$cur"))
        return 0 ;;
    --quantize)
        COMPREPLY=($(compgen -W "int8 int4" -- "$cur"))
        return 0 ;;
    --policy)
        COMPREPLY=($(compgen -W "lru freq routing adaptive all" -- "$cur"))
        return 0 ;;
    --layout)
        COMPREPLY=($(compgen -W "per-expert fused" -- "$cur"))
        return 0 ;;
    --compute-precision)
        COMPREPLY=($(compgen -W "exact bf16" -- "$cur"))
        return 0 ;;
    --format)
        COMPREPLY=($(compgen -W "csv jsonl" -- "$cur"))
        return 0 ;;
    --transport)
        COMPREPLY=($(compgen -W "grpc shm" -- "$cur"))
        return 0 ;;
    --kernel)
        COMPREPLY=($(compgen -W "auto generic avx2 avx512 amx onednn list" -- "$cur"))
        return 0 ;;
    --layer)
        [ "$cmd" = forward ] && COMPREPLY=($(compgen -W "all" -- "$cur"))
        return 0 ;;
    --out | --pack | --dir)
        COMPREPLY=($(compgen -d -- "$cur"))
        return 0 ;;
    --model)
        case $cmd in
        gen-model | inspect | gen-trace | pack | verify | trace) COMPREPLY=($(compgen -d -- "$cur")) ;;
        forward)
            for ((i = 2; i < COMP_CWORD; i++)); do
                [ "${COMP_WORDS[i]}" = --local ] && COMPREPLY=($(compgen -d -- "$cur"))
            done ;;
        esac
        return 0 ;;
    --in | --routing-in | --routing-out | --trace | --plot | --tls-ca | --tls-cert | --tls-key)
        COMPREPLY=($(compgen -f -- "$cur"))
        return 0 ;;
    --socket)
        COMPREPLY=($(compgen -f -- "$cur"))
        return 0 ;;
    --remote | --token | --timeout | --name | --layers | --experts | --top-k | --hidden | \
        --ffn | --shared-experts | --shards | --seed | --tokens | --batch | --threads | \
        --capacity | --half-life | --step | --cache-bytes | --callers | --duration | \
        --requests | --interval | --iterations | --timeout-ms | --prefetch-precision | \
        --disk-bw | --disk-latency | --compute | --expert-bytes | --shape)
        return 0 ;;
    esac

    case $cmd in
    gen-model)
        flags="--arch --out --layers --experts --top-k --hidden --ffn --shared-experts --dtype
            --shards --seed --layout --force --quiet -q" ;;
    inspect) flags="--model --json" ;;
    forward)
        flags="--local --model --layer --in --out --routing-out --routing-in --step --cache-bytes
            --policy --no-prefetch --buffered --register-buffers --trace --threads --kernel
            --compute-precision --dtype --quiet -q $remote" ;;
    gen-trace) flags="--model --tokens --out --seed --batch --threads --quiet -q" ;;
    cache-sim)
        flags="--trace --capacity --policy --prefetch --half-life --prefetch-precision --disk-bw
            --disk-latency --compute --expert-bytes --json --quiet -q" ;;
    trace)
        if ((COMP_CWORD == 2)) && [[ $cur != -* ]]; then
            COMPREPLY=($(compgen -W "import" -- "$cur"))
            return 0
        fi
        flags="--format --model --shape --quiet -q" ;;
    pack) flags="--model --out --quantize --group --force --quiet -q" ;;
    verify) flags="--pack --model --quiet -q" ;;
    stats) flags="--experts --plot $remote" ;;
    load) flags="--dir --name $remote" ;;
    drain) flags="--timeout-ms $remote" ;;
    record)
        if ((COMP_CWORD == 3)) && [[ $cur != -* ]]; then
            COMPREPLY=($(compgen -W "start stop status" -- "$cur"))
            return 0
        fi
        flags="--name --max-records --seconds $remote" ;;
    placement) flags="--model --experts $remote" ;;
    peer)
        if ((COMP_CWORD == 2)) && [[ $cur != -* ]]; then
            COMPREPLY=($(compgen -W "add remove" -- "$cur"))
            return 0
        fi
        flags=$remote ;;
    bench)
        flags="--model --layers --tokens --callers --duration --requests --dtype --seed
            --transport --quiet -q $remote" ;;
    top) flags="--interval --iterations --model --layer $remote" ;;
    status | models | unload | pin | unpin | evict | retry | resume) flags=$remote ;;
    *) return 0 ;;
    esac
    COMPREPLY=($(compgen -W "$flags --help" -- "$cur"))
    return 0
}

complete -F _moectl moectl
