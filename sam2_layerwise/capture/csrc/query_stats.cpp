// Exact per-query attention statistics over every query, without materialising softmax maps.
//
// For one attention call (q [B, Nq, d], k [B, Nk, d], float32) and every query row it returns, of
// p = softmax(scale * q k^T): entropy H = -sum p log p, max p, the mass on the k largest keys, and optionally the
// mass on given key segments. torch's own attention kernel keeps computing the model's output; this only reads
// q and k, so masks are untouched.
//
// Work is cut into tiles of whole query rows that stay in the core's L2 cache. Per tile: one single-threaded
// BLAS product (ATen's bmm inside a parallel region) writes the raw scores s = q k^T; then per row
//   pass 1: the row maximum m and the maxima of 16-key chunks (vertical maxima over 16-lane vectors),
//   pass 2: with t = scale * (s - m) and e = exp(t): z = sum e, w = sum e t (and the segment sums of e),
//   pass 3: the k largest scores lie in the k chunks with the largest maxima (a chunk outside those has a maximum
//           no larger than theirs), so top-k only reads those k chunks.
// Then H = log z - w / z, max p = 1 / z, top-k mass = sum exp(t_top) / z.
//
// The passes are plain loops over 16-lane groups that compilers vectorise; the hot functions are cloned for
// x86-64-v3 and v4 and picked at load time (no -march=native: the same binary runs on any x86-64 CPU).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t L = 16;                 // lanes: keys per chunk row; a chunk is 16 keys strided by L
constexpr int64_t BLOCK = L * L;          // keys per block of 16 chunks

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

// exp(x) for x <= 0 without a libm call, so it vectorises: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of
// ln2), exp(r) by Cephes' degree-6 polynomial (relative error ~1e-7), 2^n from the exponent bits. Below -87
// the result is 0 (exp(-87) = 1.6e-38, under float's smallest normal).
static inline float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float pow2;
    std::memcpy(&pow2, &bits, sizeof pow2);
    return x < -87.0f ? 0.0f : y * pow2;
}

// Pass 1 over one row padded to `ld` (a multiple of L, padding = -inf): the row max and the chunk maxima
// cm[blocks * L], chunk c = keys (c / L) * BLOCK + j * L + c % L.
HOT static float chunk_maxima(const float* s, int64_t ld, float* cm) {
    float rowmax[L];
    for (int64_t l = 0; l < L; ++l) rowmax[l] = -std::numeric_limits<float>::infinity();
    for (int64_t b0 = 0; b0 < ld; b0 += BLOCK) {
        const int64_t rows = std::min<int64_t>(L, (ld - b0) / L);
        float acc[L];
        for (int64_t l = 0; l < L; ++l) acc[l] = s[b0 + l];
        for (int64_t j = 1; j < rows; ++j) {
            const float* v = s + b0 + j * L;
            for (int64_t l = 0; l < L; ++l) acc[l] = acc[l] < v[l] ? v[l] : acc[l];
        }
        for (int64_t l = 0; l < L; ++l) cm[b0 / L + l] = acc[l];  // chunk (block, lane); a short block's lanes
                                                                     // hold fewer keys
        for (int64_t l = 0; l < L; ++l) rowmax[l] = rowmax[l] < acc[l] ? acc[l] : rowmax[l];
    }
    float m = rowmax[0];
    for (int64_t l = 1; l < L; ++l) m = m < rowmax[l] ? rowmax[l] : m;
    return m;
}

// Pass 2 over keys [a, b): adds sum e and sum e t to z and w; returns sum e over the range.
HOT static double exp_sums(const float* s, int64_t a, int64_t b, float m, float scale, double* z, double* w) {
    float zl[L] = {0}, wl[L] = {0};
    int64_t i = a;
    for (; i + L <= b; i += L) {
        const float* v = s + i;
        for (int64_t l = 0; l < L; ++l) {
            const float t = scale * (v[l] - m);
            const float e = exp_nonpos(t);
            zl[l] += e;
            wl[l] += e * t;
        }
    }
    double zs = 0.0, ws = 0.0;
    for (; i < b; ++i) {
        const float t = scale * (s[i] - m);
        const float e = exp_nonpos(t);
        zs += e;
        ws += static_cast<double>(e) * t;
    }
    for (int64_t l = 0; l < L; ++l) {
        zs += zl[l];
        ws += wl[l];
    }
    *z += zs;
    *w += ws;
    return zs;
}

// Keeps the k largest values seen, sorted descending in top[0..count).
struct TopK {
    float* top;
    int64_t k, count = 0;
    void push(float x) {
        if (count == k && !(x > top[k - 1])) return;
        int64_t i = count < k ? count++ : k - 1;
        while (i > 0 && top[i - 1] < x) {
            top[i] = top[i - 1];
            --i;
        }
        top[i] = x;
    }
};

struct Args {
    const float* q;      // [B, Nq, d] contiguous
    const float* k;      // [B, Nk, d] contiguous
    int64_t B, nq, nk, d, ld, topk;
    float scale;
    const int64_t* seg;  // [S, 2] sorted, disjoint key ranges, or nullptr
    int64_t nseg;
    bool stats;
    float* entropy;      // [B, Nq] (when stats)
    float* max_prob;
    float* topk_mass;
    float* seg_mass;     // [B, Nq, S] (when nseg)
};

// One tile: batch b, query rows [r0, r1). `scores` holds (r1 - r0) x ld floats; its padding is -inf.
static void tile(const Args& a, int64_t b, int64_t r0, int64_t r1, float* scores, std::vector<float>& cm,
                 std::vector<float>& topbuf, std::vector<int64_t>& chunks) {
    const int64_t rows = r1 - r0;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    auto qt = torch::from_blob(const_cast<float*>(a.q + (b * a.nq + r0) * a.d), {rows, a.d}, opts);
    auto kt = torch::from_blob(const_cast<float*>(a.k + b * a.nk * a.d), {a.nk, a.d}, opts);
    auto out = torch::from_blob(scores, {rows, a.nk}, {a.ld, 1}, opts);
    at::mm_out(out, qt, kt.t());
    for (int64_t r = 0; r < rows; ++r) {
        const float* s = scores + r * a.ld;
        const int64_t row = b * a.nq + r0 + r;
        const float m = chunk_maxima(s, a.ld, cm.data());
        double z = 0.0, w = 0.0;
        if (a.nseg) {
            float* sm = a.seg_mass + row * a.nseg;
            int64_t at = 0;
            std::vector<double> parts(a.nseg);
            for (int64_t n = 0; n < a.nseg; ++n) {
                const int64_t lo = a.seg[2 * n], hi = a.seg[2 * n + 1];
                if (lo > at) exp_sums(s, at, lo, m, a.scale, &z, &w);
                parts[n] = exp_sums(s, lo, hi, m, a.scale, &z, &w);
                at = hi;
            }
            if (at < a.nk) exp_sums(s, at, a.nk, m, a.scale, &z, &w);
            for (int64_t n = 0; n < a.nseg; ++n) sm[n] = static_cast<float>(parts[n] / z);
        } else {
            exp_sums(s, 0, a.nk, m, a.scale, &z, &w);
        }
        if (!a.stats) continue;
        a.entropy[row] = static_cast<float>(std::log(z) - w / z);
        a.max_prob[row] = static_cast<float>(1.0 / z);
        if (a.topk <= 0) {
            a.topk_mass[row] = 0.0f;
            continue;
        }
        // the k chunks with the largest maxima (chunk c = block c / L, lane c % L)
        const int64_t nchunks = (a.ld + BLOCK - 1) / BLOCK * L, kk = std::min(a.topk, a.nk);
        TopK best{topbuf.data(), kk};
        int64_t* ids = chunks.data();
        int64_t nbest = 0;
        for (int64_t c = 0; c < nchunks; ++c) {  // keeps ids sorted by their maxima, descending
            const float x = cm[c];
            if (nbest == kk && !(x > cm[ids[kk - 1]])) continue;
            int64_t i = nbest < kk ? nbest++ : kk - 1;
            while (i > 0 && cm[ids[i - 1]] < x) {
                ids[i] = ids[i - 1];
                --i;
            }
            ids[i] = c;
        }
        for (int64_t n = 0; n < nbest; ++n) {
            const int64_t c = ids[n], b0 = (c / L) * BLOCK, lane = c % L;
            for (int64_t j = 0; j < L; ++j) {
                const int64_t key = b0 + j * L + lane;
                if (key >= a.ld) break;
                best.push(s[key]);  // padding is -inf and never outranks a real key
            }
        }
        double top = 0.0;
        for (int64_t n = 0; n < best.count; ++n) top += exp_nonpos(a.scale * (best.top[n] - m));
        a.topk_mass[row] = static_cast<float>(top / z);
    }
}

}  // namespace

// q [B, Nq, d], k [B, Nk, d] float32 contiguous CPU tensors. segments: int64 [S, 2] sorted disjoint ranges (may be
// empty). Returns (entropy, max_prob, topk_mass) [B, Nq] (empty when !stats) and segment mass [B, Nq, S].
std::vector<torch::Tensor> query_stats(torch::Tensor q, torch::Tensor k, double scale, int64_t topk,
                                       torch::Tensor segments, bool stats, int64_t tile_elements) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [B, N, d]");
    TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32, "float32 only");
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "contiguous tensors only");
    TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "q and k shapes disagree");
    TORCH_CHECK(k.size(1) > 0, "no keys");
    TORCH_CHECK(scale > 0, "scale must be positive");
    const int64_t B = q.size(0), nq = q.size(1), nk = k.size(1), d = q.size(2);
    const int64_t ld = (nk + L - 1) / L * L;
    auto seg = segments.to(torch::kInt64).contiguous();
    const int64_t nseg = seg.numel() / 2;
    for (int64_t n = 0; n < nseg; ++n) {
        const int64_t lo = seg.data_ptr<int64_t>()[2 * n], hi = seg.data_ptr<int64_t>()[2 * n + 1];
        const int64_t prev = n ? seg.data_ptr<int64_t>()[2 * n - 1] : 0;
        TORCH_CHECK(prev <= lo && lo <= hi && hi <= nk, "segments must be sorted, disjoint and inside the keys");
    }
    auto f = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor ent, mx, top;
    if (stats) {
        ent = torch::empty({B, nq}, f);
        mx = torch::empty({B, nq}, f);
        top = torch::empty({B, nq}, f);
    } else {
        ent = mx = top = torch::empty({0}, f);
    }
    auto segm = torch::empty({B, nq, nseg}, f);
    Args a{q.data_ptr<float>(), k.data_ptr<float>(), B, nq, nk, d, ld, topk, static_cast<float>(scale),
           nseg ? seg.data_ptr<int64_t>() : nullptr, nseg, stats,
           stats ? ent.data_ptr<float>() : nullptr, stats ? mx.data_ptr<float>() : nullptr,
           stats ? top.data_ptr<float>() : nullptr, segm.data_ptr<float>()};
    const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(nq, tile_elements / ld));
    const int64_t tiles_per_batch = (nq + rows_per_tile - 1) / rows_per_tile;
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, B * tiles_per_batch, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> scores(rows_per_tile * ld, -std::numeric_limits<float>::infinity());
            std::vector<float> cm((ld + BLOCK - 1) / BLOCK * L);
            std::vector<float> topbuf(std::max<int64_t>(1, std::min(topk, nk)));
            std::vector<int64_t> chunks(std::max<int64_t>(1, std::min(topk, nk)));
            for (int64_t t = begin; t < end; ++t) {
                const int64_t b = t / tiles_per_batch, r0 = (t % tiles_per_batch) * rows_per_tile;
                tile(a, b, r0, std::min(nq, r0 + rows_per_tile), scores.data(), cm, topbuf, chunks);
            }
        });
    }
    return {ent, mx, top, segm};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("query_stats", &query_stats, "Exact per-query softmax statistics (entropy, max, top-k, segment mass)");
}
