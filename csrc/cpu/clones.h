// Which instruction sets the CPU hot loops are compiled for: GCC target
// clones for AVX-512, AVX2 and baseline x86-64, the CPU picking one when the
// library loads. The build uses -ffp-contract=off and no loop reassociates a
// sum, so every clone gives the same bits.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(RESNET_FUSED_NO_TARGET_CLONES)
#define RF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define RF_CPU_TARGETS "avx512f,avx2,default"
#else
#define RF_CPU_CLONES
#define RF_CPU_TARGETS "default"
#endif
