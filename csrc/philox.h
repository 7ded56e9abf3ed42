// Philox4x32-10 counter-based generator (Salmon et al., SC'11) and the Gaussian draws of the
// coordinate jitter. Shared by the CPU and CUDA kernels so both draw the same numbers.
#pragma once
#include <cmath>
#include <cstdint>

#include "grid_common.h"

namespace grad_ext {

struct Philox4 {
  uint32_t v[4];
};

GE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

GE_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// Uniform in (0, 1): never 0, so the logarithm below is finite.
GE_HD float uint_to_unit(uint32_t x) {
  return static_cast<float>(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// The random numbers of one jittered call: keyed by the seed, the offset selects the
// stream, the point index the counter, so any point's noise can be recomputed anywhere.
struct JitterParams {
  float std = 0.f;
  float prob = 0.f;
  int mode = 0;  // 0: per point, 1: per call
  uint32_t k0 = 0, k1 = 0, off0 = 0, off1 = 0;
  bool active = false;
};

GE_HD JitterParams make_jitter(float std, float prob, int mode, int64_t seed, int64_t offset) {
  JitterParams j;
  j.std = std;
  j.prob = prob;
  j.mode = mode;
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  j.k0 = static_cast<uint32_t>(s);
  j.k1 = static_cast<uint32_t>(s >> 32);
  j.off0 = static_cast<uint32_t>(o);
  j.off1 = static_cast<uint32_t>(o >> 32);
  j.active = std > 0.f && prob > 0.f;
  if (j.active && mode == 1) {
    // One draw for the whole call, on a counter no point index reaches.
    const Philox4 r = philox4x32_10(Philox4{{0xFFFFFFFFu, 0xFFFFFFFFu, j.off0, j.off1}}, j.k0, j.k1);
    j.active = uint_to_unit(r.v[0]) < prob;
  }
  return j;
}

// Writes the noise of point `point` into noise[0..3] (already scaled by std) and returns
// whether the point is jittered. Components: Box-Muller on (v0, v1) and (v2, v3).
GE_HD bool jitter_point(const JitterParams& j, int64_t point, float noise[4]) {
  noise[0] = noise[1] = noise[2] = noise[3] = 0.f;
  if (!j.active) return false;
  const uint64_t p = static_cast<uint64_t>(point);
  const uint32_t p0 = static_cast<uint32_t>(p), p1 = static_cast<uint32_t>(p >> 32);
  if (j.mode == 0) {
    const Philox4 coin = philox4x32_10(Philox4{{p0, p1 | 0x80000000u, j.off0, j.off1}}, j.k0, j.k1);
    if (!(uint_to_unit(coin.v[0]) < j.prob)) return false;
  }
  const Philox4 r = philox4x32_10(Philox4{{p0, p1, j.off0, j.off1}}, j.k0, j.k1);
  constexpr float kTwoPi = 6.283185307179586f;
  const float r0 = sqrtf(-2.f * logf(uint_to_unit(r.v[0])));
  const float r1 = sqrtf(-2.f * logf(uint_to_unit(r.v[2])));
  const float a0 = kTwoPi * uint_to_unit(r.v[1]);
  const float a1 = kTwoPi * uint_to_unit(r.v[3]);
  noise[0] = j.std * r0 * cosf(a0);
  noise[1] = j.std * r0 * sinf(a0);
  noise[2] = j.std * r1 * cosf(a1);
  noise[3] = j.std * r1 * sinf(a1);
  return true;
}

}  // namespace grad_ext
