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
// Fast attention (opt-in, `--fast-attention`): given v, pass 4 turns each row into its probabilities in place and
// a second product per tile gives the attention output p v, replacing torch's fused kernel for that call. Its
// output differs from torch's in the last bits (another summation order), so masks may differ from plain SAM 2.
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
constexpr int64_t SPAN = 4096;            // values summed in float lanes before they go to float64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

typedef float vf __attribute__((vector_size(4 * L)));    // 16 floats: one zmm, two ymm or four xmm
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef double vd __attribute__((vector_size(8 * L)));  // 16 doubles

#define INLINE inline __attribute__((always_inline))

static INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

static INLINE vf splat(float x) {
    return vf{} + x;
}

static INLINE vi splat_i(int32_t x) {
    return vi{} + x;
}

// Horizontal max and sum of 16 lanes as a tree of in-register shuffles (depth 4, not a chain of 16 dependent
// steps; the sum's order is then the tree's, which the callers accept).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SWAP(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
template <typename T, typename V>
static INLINE T tree_reduce(V v, bool maximum) {
    auto step = [maximum](V x, V y) { return maximum ? (y > x ? y : x) : x + y; };
    v = step(v, SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = step(v, SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = step(v, SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = step(v, SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}
#undef SWAP
#else
template <typename T, typename V>
static INLINE T tree_reduce(const V& v, bool maximum) {
    T a[L];
    for (int64_t l = 0; l < L; ++l) a[l] = v[l];
    for (int64_t w = L / 2; w >= 1; w /= 2) {
        for (int64_t l = 0; l < w; ++l) a[l] = maximum ? (a[l + w] > a[l] ? a[l + w] : a[l]) : a[l] + a[l + w];
    }
    return a[0];
}
#endif

// exp(x) for x <= 0 without a libm call, 16 at a time: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2),
// exp(r) by Cephes' degree-6 polynomial (relative error ~1e-7), 2^n from the exponent bits. Below -87 the result
// is 0 (exp(-87) = 1.6e-38, under float's smallest normal).
static INLINE vf exp_nonpos(vf x) {
    const vf lo = splat(-87.0f);
    const vf xc = x < lo ? lo : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf n = (xc * 1.44269504088896341f + magic) - magic;
    vf r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const vf y = p * r * r + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    const vf pow2 = reinterpret_cast<const vf&>(bits);
    return x < lo ? vf{} : y * pow2;
}

static INLINE float exp_nonpos1(float x) {
    return exp_nonpos(splat(x))[0];
}

struct RowOut {
    double z, w;  // sum e, sum e t
};

struct Sums {  // pass 2's running sums: e = exp(t), t = scale * (s - m)
    vf mv;
    float m, scale;
    vf zv{}, wv{};
    double zt = 0.0, wt = 0.0;
};

// Keys [a, b) of a row: adds sum e and sum e t to `acc`, returns sum e over the range.
static INLINE double sum_range(Sums& acc, const float* s, int64_t a, int64_t b) {
    vf part{};
    int64_t i = a;
    for (; i + L <= b; i += L) {
        const vf t = (load(s + i) - acc.mv) * acc.scale;
        const vf e = exp_nonpos(t);
        part += e;
        acc.wv += e > 0 ? e * t : splat(0.0f);  // a key at -inf: e = 0 adds 0, not 0 * -inf
    }
    double sum = tree_reduce<double>(__builtin_convertvector(part, vd), false);
    acc.zv += part;
    for (; i < b; ++i) {
        const float t = (s[i] - acc.m) * acc.scale;
        const float e = exp_nonpos1(t);
        sum += e;
        acc.zt += e;
        if (e > 0) acc.wt += static_cast<double>(e) * t;
    }
    return sum;
}

// Passes 1 and 2 over one row padded to `ld` (a multiple of L, padding -inf): the row max and in `cm` the chunk
// maxima [blocks * L] (chunk c = keys (c / L) * BLOCK + j * L + c % L), the lane maxima [L] (lane l = keys l mod L)
// and the block maxima [blocks]; then z and w over keys [0, nk) and the sums of e
// over each key segment (seg_sum[n], when nseg).
HOT static float row_sums(const float* s, int64_t ld, int64_t nk, float scale, float* cm, const int64_t* seg,
                          int64_t nseg, double* seg_sum, RowOut* out) {
    vf rowmax = splat(-std::numeric_limits<float>::infinity());
    const int64_t nchunks = (ld + BLOCK - 1) / BLOCK * L;
    for (int64_t b0 = 0; b0 < ld; b0 += BLOCK) {
        const int64_t rows = std::min<int64_t>(L, (ld - b0) / L);
        vf acc = load(s + b0);
        for (int64_t j = 1; j < rows; ++j) {
            const vf v = load(s + b0 + j * L);
            acc = acc < v ? v : acc;
        }
        std::memcpy(cm + b0 / L, &acc, sizeof acc);
        cm[nchunks + L + b0 / BLOCK] = tree_reduce<float>(acc, true);
        rowmax = rowmax < acc ? acc : rowmax;
    }
    std::memcpy(cm + nchunks, &rowmax, sizeof rowmax);
    const float m = tree_reduce<float>(rowmax, true);

    Sums acc{splat(m), m, scale};
    if (nseg) {
        int64_t at = 0;
        for (int64_t n = 0; n < nseg; ++n) {
            if (seg[2 * n] > at) sum_range(acc, s, at, seg[2 * n]);
            seg_sum[n] = sum_range(acc, s, seg[2 * n], seg[2 * n + 1]);
            at = seg[2 * n + 1];
        }
        if (at < nk) sum_range(acc, s, at, nk);
    } else {
        sum_range(acc, s, 0, nk);
    }
    out->z = acc.zt + tree_reduce<double>(__builtin_convertvector(acc.zv, vd), false);
    out->w = acc.wt + tree_reduce<double>(__builtin_convertvector(acc.wv, vd), false);
    return m;
}

// Keeps the k largest values pushed in best[0..count), sorted descending.
static INLINE void push(float* best, int64_t& count, int64_t k, float x) {
    if (count == k && !(x > best[k - 1])) return;
    int64_t i = count < k ? count++ : k - 1;
    while (i > 0 && best[i - 1] < x) {
        best[i] = best[i - 1];
        --i;
    }
    best[i] = x;
}

// Short rows (ld <= BLOCK, padded with -inf to ld, a multiple of L): the sum over the k largest values x of
// f(x), in at most k + 1 rounds, each one read of the row finding the largest value below the previous one and
// counting the previous one's copies (ties count as often as they occur). No per-key branches, no sorted list,
// no per-row setup: on rows of 16-256 keys this beats ranking candidates chunk by chunk.
template <typename F>
static INLINE double topk_rounds(const float* x, int64_t ld, int64_t k, F f) {
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t nv = ld / L;
    double total = 0.0;
    float upper = inf;  // the value found last round
    int64_t remaining = k;
    while (remaining > 0) {
        const vf vu = splat(upper);
        vf cur = splat(-inf), same{};
        for (int64_t j = 0; j < nv; ++j) {
            const vf v = load(x + j * L);
            const vf below = v < vu ? v : splat(-inf);  // two selects: GCC lowers an AND of masks through memory
            cur = below > cur ? below : cur;
            same += v == vu ? splat(1.0f) : vf{};
        }
        if (upper < inf) {  // copies of last round's value: as many as still wanted
            const float copies = tree_reduce<float>(same, false);  // whole numbers <= 256: exact in any order
            const int64_t take = std::min<int64_t>(remaining, static_cast<int64_t>(copies));
            total += f(upper) * take;
            remaining -= take;
        }
        const float next = tree_reduce<float>(cur, true);
        if (!(next > -inf)) break;  // no smaller value left (or NaN)
        upper = next;
    }
    return total;
}

// The k-th largest of the 16 values at v (1 <= k <= 16): each lane is ranked against every other, with no
// data-dependent branch; it is the smallest value with fewer than k larger ones.
static INLINE float kth_of_block(const float* v, int64_t k) {
    const vf x = load(v);
    vi rank{};
    for (int64_t j = 0; j < L; ++j) rank += (splat(v[j]) > x) ? vi{} + 1 : vi{};
    const vf kept = rank < static_cast<int32_t>(k) ? x : splat(std::numeric_limits<float>::infinity());
    float theta = kept[0];
    for (int64_t l = 1; l < L; ++l) theta = kept[l] < theta ? kept[l] : theta;
    return theta;
}

// Pass 3: the sum of exp(scale * (x - m)) over the k largest scores x of the row (1 <= k <= nk).
// Any theta no larger than the k-th largest score lets only keys >= theta be ranked. The k-th largest of the 16
// lane maxima is one (they are 16 different keys, k of them at least that large): theta for k <= 16; else the
// k-th largest chunk maximum (k <= chunks), or -inf. Blocks and chunks whose maximum is below theta are skipped. `best` has room for k values.
HOT static double row_topk(const float* s, int64_t ld, const float* cm, int64_t nchunks, int64_t k, float m,
                           float scale, float* best) {
    if (ld <= BLOCK) {
        return topk_rounds(s, ld, k, [m, scale](float x) { return static_cast<double>(exp_nonpos1((x - m) * scale)); });
    }
    float theta = -std::numeric_limits<float>::infinity();
    int64_t count = 0;
    if (k <= L) {
        theta = kth_of_block(cm + nchunks, k);  // the 16 lane maxima are 16 different keys
    } else if (k <= nchunks) {
        for (int64_t c = 0; c < nchunks; ++c) push(best, count, k, cm[c]);
        theta = best[k - 1];
        count = 0;
    }
    const float* bmax = cm + nchunks + L;
    for (int64_t c0 = 0; c0 < nchunks; c0 += L) {
        if (bmax[c0 / L] < theta) continue;  // nothing in this block reaches theta
        const int64_t b0 = (c0 / L) * BLOCK, stop = std::min(ld, b0 + BLOCK);
        for (int64_t lane = 0; lane < L; ++lane) {
            if (cm[c0 + lane] < theta) continue;
            for (int64_t key = b0 + lane; key < stop; key += L) {
                const float x = s[key];
                if (x >= theta && x > -std::numeric_limits<float>::infinity()) push(best, count, k, x);  // not padding
            }
        }
    }
    double top = 0.0;
    for (int64_t n0 = 0; n0 < count; n0 += L) {  // exp of up to 16 at a time
        float t[L];
        for (int64_t l = 0; l < L; ++l) t[l] = n0 + l < count ? (best[n0 + l] - m) * scale : -100.0f;
        const vf e = exp_nonpos(load(t));
        for (int64_t l = 0; l < L; ++l) top += e[l];
    }
    return top;
}

struct Args {
    const float* q;      // [G, h, Nq, d], last dimension contiguous; batch b = (b / h, b % h)
    const float* k;      // [G, h, Nk, d], likewise
    int64_t qs[3], ks[3];  // strides of the first three dimensions
    int64_t h, B, nq, nk, d, ld, topk;
    float scale;
    const int64_t* seg;  // [S, 2] sorted, disjoint key ranges, or nullptr
    int64_t nseg;
    bool stats;
    float* entropy;      // [B, Nq] (when stats)
    float* max_prob;
    float* topk_mass;
    float* seg_mass;     // [B, Nq, S] (when nseg)
    // fast attention only (else nullptr): v [G, h, Nk, dv] (strides vs, last dimension contiguous) and the output
    // out = softmax(scale q k^T) v [B, Nq, dv], contiguous
    const float* v = nullptr;
    int64_t vs[3] = {0, 0, 0};
    int64_t dv = 0;
    float* out = nullptr;
};

// Pass 4 (fast attention): the row's probabilities p = exp(scale (s - m)) / z in place of its scores.
HOT static void row_probs(float* s, int64_t ld, float m, float scale, float inv_z) {
    for (int64_t j = 0; j < ld; j += L) {
        const vf p = exp_nonpos((load(s + j) - m) * scale) * inv_z;
        std::memcpy(s + j, &p, sizeof p);
    }
}

// One tile: batch b, query rows [r0, r1). `scores` holds (r1 - r0) x ld floats; its padding is -inf.
// One tile: batches [b0, b1) x query rows [r0, r1) (several batches only with all their rows). `scores` holds
// (b1 - b0) * (r1 - r0) rows of ld floats; its padding is -inf.
static void tile(const Args& a, int64_t b0, int64_t b1, int64_t r0, int64_t r1, float* scores, std::vector<float>& cm,
                 std::vector<float>& topbuf, std::vector<double>& parts) {
    const int64_t nb = b1 - b0, rows = r1 - r0;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    // q and k are read where they lie (SAM 2's are views into one qkv projection): one batched product per run
    // of batches a single stride apart (the heads of one group, or every batch where groups follow on evenly)
    const bool even = a.qs[0] == a.h * a.qs[1] && a.ks[0] == a.h * a.ks[1] && (!a.v || a.vs[0] == a.h * a.vs[1]);
    for (int64_t b = b0; b < b1;) {
        const int64_t g = b / a.h, hh = b % a.h, stop = even ? b1 : std::min(b1, (g + 1) * a.h), n = stop - b;
        auto qt = torch::from_blob(const_cast<float*>(a.q + g * a.qs[0] + hh * a.qs[1] + r0 * a.qs[2]),
                                   {n, rows, a.d}, {a.qs[1], a.qs[2], 1}, opts);
        auto kt = torch::from_blob(const_cast<float*>(a.k + g * a.ks[0] + hh * a.ks[1]), {n, a.nk, a.d},
                                   {a.ks[1], a.ks[2], 1}, opts);
        auto out = torch::from_blob(scores + (b - b0) * rows * a.ld, {n, rows, a.nk}, {rows * a.ld, a.ld, 1}, opts);
        at::bmm_out(out, qt, kt.transpose(1, 2));
        b = stop;
    }
    const int64_t nchunks = (a.ld + BLOCK - 1) / BLOCK * L, kk = std::min(a.topk, a.nk);
    for (int64_t r = 0; r < nb * rows; ++r) {
        const float* s = scores + r * a.ld;
        const int64_t row = (b0 + r / rows) * a.nq + r0 + r % rows;
        RowOut sums;
        const float m = row_sums(s, a.ld, a.nk, a.scale, cm.data(), a.seg, a.nseg, parts.data(), &sums);
        for (int64_t n = 0; n < a.nseg; ++n) a.seg_mass[row * a.nseg + n] = static_cast<float>(parts[n] / sums.z);
        if (!a.stats) continue;
        a.entropy[row] = static_cast<float>(std::log(sums.z) - sums.w / sums.z);
        a.max_prob[row] = static_cast<float>(1.0 / sums.z);
        a.topk_mass[row] = kk > 0 ? static_cast<float>(row_topk(s, a.ld, cm.data(), nchunks, kk, m, a.scale,
                                                                 topbuf.data()) / sums.z) : 0.0f;
        if (a.out) row_probs(scores + r * a.ld, a.ld, m, a.scale, static_cast<float>(1.0 / sums.z));
    }
    if (!a.out) return;
    for (int64_t b = b0; b < b1;) {  // out = p v, batches as for the scores
        const int64_t g = b / a.h, hh = b % a.h, stop = even ? b1 : std::min(b1, (g + 1) * a.h), n = stop - b;
        auto pt = torch::from_blob(scores + (b - b0) * rows * a.ld, {n, rows, a.nk}, {rows * a.ld, a.ld, 1}, opts);
        auto vt = torch::from_blob(const_cast<float*>(a.v + g * a.vs[0] + hh * a.vs[1]), {n, a.nk, a.dv},
                                   {a.vs[1], a.vs[2], 1}, opts);
        auto ot = torch::from_blob(a.out + (b * a.nq + r0) * a.dv, {n, rows, a.dv}, {a.nq * a.dv, a.dv, 1}, opts);
        at::bmm_out(ot, pt, vt);
        b = stop;
    }
}

}  // namespace

// q [G, h, Nq, d], k [G, h, Nk, d] float32 CPU tensors, any strides but a contiguous last dimension. segments:
// int64 [S, 2] sorted disjoint ranges (may be empty). Returns (entropy, max_prob, topk_mass) [G * h, Nq] (empty
// when !stats), segment mass [G * h, Nq, S] and, given v [G, h, Nk, dv] (fast attention: stats, no segments),
// the attention output softmax(scale q k^T) v [G * h, Nq, dv] computed from the same tiles (else empty).
std::vector<torch::Tensor> query_stats(torch::Tensor q, torch::Tensor k, double scale, int64_t topk,
                                       torch::Tensor segments, bool stats, int64_t tile_elements,
                                       std::optional<torch::Tensor> v) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be [G, h, N, d]");
    TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32, "float32 only");
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "the last dimension must be contiguous");
    TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "q and k shapes disagree");
    TORCH_CHECK(k.size(2) > 0, "no keys");
    TORCH_CHECK(scale > 0, "scale must be positive");
    const int64_t h = q.size(1), B = q.size(0) * h, nq = q.size(2), nk = k.size(2), d = q.size(3);
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
    Args a{q.data_ptr<float>(), k.data_ptr<float>(), {q.stride(0), q.stride(1), q.stride(2)},
           {k.stride(0), k.stride(1), k.stride(2)}, h, B, nq, nk, d, ld, topk, static_cast<float>(scale),
           nseg ? seg.data_ptr<int64_t>() : nullptr, nseg, stats,
           stats ? ent.data_ptr<float>() : nullptr, stats ? mx.data_ptr<float>() : nullptr,
           stats ? top.data_ptr<float>() : nullptr, segm.data_ptr<float>()};
    torch::Tensor out = torch::empty({0}, f);
    if (v.has_value()) {
        const auto& vv = *v;
        TORCH_CHECK(stats && nseg == 0, "fast attention computes the statistics and no segments");
        TORCH_CHECK(vv.dim() == 4 && vv.scalar_type() == torch::kFloat32 && vv.device().is_cpu() && vv.stride(3) == 1,
                    "v must be a float32 CPU [G, h, Nk, dv] tensor with a contiguous last dimension");
        TORCH_CHECK(vv.size(0) == q.size(0) && vv.size(1) == h && vv.size(2) == nk, "v does not fit q and k");
        out = torch::empty({B, nq, vv.size(3)}, f);
        a.v = vv.data_ptr<float>();
        a.vs[0] = vv.stride(0);
        a.vs[1] = vv.stride(1);
        a.vs[2] = vv.stride(2);
        a.dv = vv.size(3);
        a.out = out.data_ptr<float>();
    }
    // tiles: whole batches while one holds at most tile_elements scores, else row ranges of one batch
    const int64_t per_batch = nq * ld;
    const int64_t batches_per_tile = per_batch <= tile_elements ? std::max<int64_t>(1, tile_elements / per_batch) : 1;
    // Every tile reads all of k: where k outgrows the L2 cache (memory attention: 28,736 x 256 floats), tiles of
    // at least 64 rows keep the product from streaming k from memory once per handful of rows.
    const int64_t min_rows = nk * d > (1 << 18) ? 64 : 1;
    // Row tiles of one long batch hold up to twice as many scores (2 MiB, 128 rows of 4096 keys): the product
    // packs k once per tile, and twice the rows per packing measured 8-20 % faster on global blocks (d 56, 96).
    const int64_t rows_per_tile = per_batch <= tile_elements ? nq
                                  : std::min<int64_t>(nq, std::max<int64_t>(min_rows, 2 * tile_elements / ld));
    const int64_t tiles_per_batch = (nq + rows_per_tile - 1) / rows_per_tile;
    const int64_t ntiles = batches_per_tile > 1 ? (B + batches_per_tile - 1) / batches_per_tile : B * tiles_per_batch;
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> scores(batches_per_tile * rows_per_tile * ld, -std::numeric_limits<float>::infinity());
            std::vector<float> cm((ld + BLOCK - 1) / BLOCK * (L + 1) + L);  // chunk, lane and block maxima
            std::vector<float> topbuf(std::max<int64_t>(1, std::min(topk, nk)) + L);
            std::vector<double> parts(std::max<int64_t>(1, nseg));
            for (int64_t t = begin; t < end; ++t) {
                if (batches_per_tile > 1) {
                    const int64_t b0 = t * batches_per_tile;
                    tile(a, b0, std::min(B, b0 + batches_per_tile), 0, nq, scores.data(), cm, topbuf, parts);
                } else {
                    const int64_t b = t / tiles_per_batch, r0 = (t % tiles_per_batch) * rows_per_tile;
                    tile(a, b, b + 1, r0, std::min(nq, r0 + rows_per_tile), scores.data(), cm, topbuf, parts);
                }
            }
        });
    }
    return {ent, mx, top, segm, out};
}

namespace {

struct Moments {
    vf lo, hi;
    double sum = 0.0, squares = 0.0;
};

// min, max, sum and sum of squares of x[0..n) in one read (sums in float lanes per 4096 values, then double).
HOT static Moments moments(const float* x, int64_t n) {
    Moments m{splat(std::numeric_limits<float>::infinity()), splat(-std::numeric_limits<float>::infinity())};
    for (int64_t a = 0; a < n; a += SPAN) {
        const int64_t b = std::min(n, a + SPAN);
        vf s{}, q{};
        int64_t i = a;
        for (; i + L <= b; i += L) {
            const vf v = load(x + i);
            m.lo = v < m.lo ? v : m.lo;
            m.hi = v > m.hi ? v : m.hi;
            s += v;
            q += v * v;
        }
        for (int64_t l = 0; l < L; ++l) {
            m.sum += s[l];
            m.squares += q[l];
        }
        for (; i < b; ++i) {
            m.lo[0] = std::min(m.lo[0], x[i]);
            m.hi[0] = std::max(m.hi[0], x[i]);
            m.sum += x[i];
            m.squares += static_cast<double>(x[i]) * x[i];
        }
    }
    return m;
}

}  // namespace

// (min, max, sum, sum of squares) of a contiguous float32 CPU tensor, as float64, in one parallel read.
// NaN propagates into the sums (min/max then ignore it, like a comparison does); callers check finiteness apart.
torch::Tensor tensor_moments(torch::Tensor t) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous(),
                "contiguous float32 CPU tensor only");
    const float* x = t.data_ptr<float>();
    const int64_t n = t.numel();
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, n / (1 << 16)));
    std::vector<Moments> found(parts);
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p) {
                const int64_t a = n * p / parts, b = n * (p + 1) / parts;
                found[p] = moments(x + a, b - a);
            }
        });
    }
    double lo = std::numeric_limits<double>::infinity(), hi = -lo, sum = 0.0, squares = 0.0;
    for (const auto& m : found) {
        for (int64_t l = 0; l < L; ++l) {
            lo = std::min<double>(lo, m.lo[l]);
            hi = std::max<double>(hi, m.hi[l]);
        }
        sum += m.sum;
        squares += m.squares;
    }
    return torch::tensor({lo, hi, sum, squares}, torch::TensorOptions().dtype(torch::kFloat64));
}

namespace {

struct ErrorSums {
    double clipped = 0.0, err2 = 0.0, ref2 = 0.0;
    float max_err = 0.0f;

    void add(const ErrorSums& o) {
        clipped += o.clipped;
        err2 += o.err2;
        ref2 += o.ref2;
        max_err = std::max(max_err, o.max_err);
    }

    // one value x, its fake-quantized q and (when has_code) its unclamped code
    void add_one(float x, float q, bool has_code, float code, float lo, float hi) {
        const float e = q - x;
        err2 += static_cast<double>(e) * e;
        ref2 += static_cast<double>(x) * x;
        max_err = std::max(max_err, std::fabs(e));
        if (has_code && (code < lo || code > hi)) clipped += 1.0;
    }

    // (codes outside [lo, hi], sum (q - x)^2, sum x^2, max |q - x|) as float64
    torch::Tensor tensor() const {
        return torch::tensor({clipped, err2, ref2, static_cast<double>(max_err)},
                             torch::TensorOptions().dtype(torch::kFloat64));
    }
};

// ErrorSums in float lanes, 16 values at a time; `flush` moves the sums into float64 (once per 4096 values).
struct ErrorLanes {
    vf e2{}, r2{}, cl{}, mx{};

    INLINE void add(vf x, vf q) {
        const vf e = q - x;
        e2 += e * e;
        r2 += x * x;
        const vf ae = e < 0 ? -e : e;
        mx = ae > mx ? ae : mx;
    }

    INLINE void add_code(vf code, vf lo, vf hi) {
        // two selects: GCC lowers an OR of two AVX-512 masks through memory (4x slower)
        cl += code < lo ? splat(1.0f) : vf{};
        cl += code > hi ? splat(1.0f) : vf{};
    }

    INLINE void flush(ErrorSums& out) {
        for (int64_t l = 0; l < L; ++l) {
            out.err2 += e2[l];
            out.ref2 += r2[l];
            out.clipped += cl[l];
        }
        e2 = r2 = cl = vf{};
    }

    INLINE void finish(ErrorSums& out) const {
        for (int64_t l = 0; l < L; ++l) out.max_err = std::max(out.max_err, mx[l]);
    }
};

// One read of x, its fake-quantized xq and (when raw) the unclamped codes: codes outside [lo, hi], sum (xq - x)^2,
// sum x^2 and max |xq - x|.
HOT static ErrorSums error_sums(const float* x, const float* xq, const float* raw, float lo, float hi, int64_t n) {
    ErrorSums out;
    ErrorLanes lanes;
    const vf vlo = splat(lo), vhi = splat(hi);
    for (int64_t a = 0; a < n; a += SPAN) {
        const int64_t b = std::min(n, a + SPAN);
        int64_t i = a;
        for (; i + L <= b; i += L) {
            lanes.add(load(x + i), load(xq + i));
            if (raw) lanes.add_code(load(raw + i), vlo, vhi);
        }
        lanes.flush(out);
        for (; i < b; ++i) out.add_one(x[i], xq[i], raw != nullptr, raw ? raw[i] : 0.0f, lo, hi);
    }
    lanes.finish(out);
    return out;
}

}  // namespace

// What a fake quantizer did to x (contiguous float32 CPU tensors of one shape): (codes outside [lo, hi] when raw is
// given, sum (xq - x)^2, sum x^2, max |xq - x|) as float64, in one parallel read.
torch::Tensor quant_error(torch::Tensor x, torch::Tensor xq, torch::Tensor raw, double lo, double hi) {
    for (const auto* t : {&x, &xq}) {
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->is_contiguous(),
                    "contiguous float32 CPU tensors only");
    }
    TORCH_CHECK(xq.numel() == x.numel(), "x and xq differ in size");
    const bool codes = raw.numel() > 0;
    TORCH_CHECK(!codes || (raw.scalar_type() == torch::kFloat32 && raw.is_contiguous() && raw.numel() == x.numel()),
                "raw codes must be a contiguous float32 tensor of x's size");
    const int64_t n = x.numel();
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, n / (1 << 16)));
    std::vector<ErrorSums> found(parts);
    const float *px = x.data_ptr<float>(), *pq = xq.data_ptr<float>(), *pr = codes ? raw.data_ptr<float>() : nullptr;
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p) {
                const int64_t a = n * p / parts, b = n * (p + 1) / parts;
                found[p] = error_sums(px + a, pq + a, pr ? pr + a : nullptr, static_cast<float>(lo),
                                      static_cast<float>(hi), b - a);
            }
        });
    }
    ErrorSums all;
    for (const auto& f : found) all.add(f);
    return all.tensor();
}

namespace {

// Rounds to the nearest integer, ties to even, as torch.round (rint in the default rounding mode): |y| < 2^23 is
// rounded by adding and taking away 2^23 (the sum's last bit is the integer's), larger |y| is already integral;
// the sign is put back (round(-0.3) = -0.0) and NaN passes through.
static INLINE vf round_even(vf y) {
    const vf big = splat(8388608.0f);  // 2^23
    const vi sign = (vi)y & splat_i(INT32_MIN);
    const vf a = (vf)((vi)y & splat_i(INT32_MAX));
    const vf r = (a + big) - big;
    const vf rounded = (vf)((vi)r | sign);
    return a < big ? rounded : y;
}

// out = (clamp(round(x / s) + z, lo, hi) - z) * s over x[0..n), each step a float32 operation in the order torch's
// ops run them (`quant.quantizers.fake_quantize`), so the result is bit-identical to them. With `monitor` the
// error sums of `error_sums` in the same read (codes outside [lo, hi] counted before the clamp). `s` and `z` point
// at one scale and zero point, or (per_element) at n of each: channels along x's last dimensions.
template <bool per_element>
static INLINE ErrorSums quant_span(const float* x, float* out, int64_t n, const float* s, const float* z, float lo,
                                   float hi, bool monitor) {
    ErrorSums found;
    ErrorLanes lanes;
    const vf vlo = splat(lo), vhi = splat(hi);
    auto quantize = [&](vf v, vf vs, vf vz, vf& raw) {
        raw = round_even(v / vs) + vz;
        vf c = raw < vlo ? vlo : raw;  // NaN stays NaN, as in torch.clamp
        c = c > vhi ? vhi : c;
        return (c - vz) * vs;
    };
    for (int64_t a = 0; a < n; a += SPAN) {
        const int64_t b = std::min(n, a + SPAN);
        int64_t i = a;
        for (; i + L <= b; i += L) {
            const vf v = load(x + i);
            vf raw;
            const vf q = per_element ? quantize(v, load(s + i), load(z + i), raw) : quantize(v, splat(*s), splat(*z), raw);
            std::memcpy(out + i, &q, sizeof q);
            if (monitor) {
                lanes.add(v, q);
                lanes.add_code(raw, vlo, vhi);
            }
        }
        if (monitor) lanes.flush(found);
        if (i < b) {  // the tail, through one padded vector (padding: scale 1, zero point 0)
            float tail[L] = {}, ts[L], tz[L] = {};
            for (int64_t l = 0; l < L; ++l) ts[l] = 1.0f;
            std::memcpy(tail, x + i, sizeof(float) * (b - i));
            if (per_element) {
                std::memcpy(ts, s + i, sizeof(float) * (b - i));
                std::memcpy(tz, z + i, sizeof(float) * (b - i));
            }
            const vf v = load(tail);
            vf raw;
            const vf q = per_element ? quantize(v, load(ts), load(tz), raw) : quantize(v, splat(*s), splat(*z), raw);
            std::memcpy(tail, &q, sizeof q);
            std::memcpy(out + i, tail, sizeof(float) * (b - i));
            if (monitor) {
                for (int64_t l = 0; l < b - i; ++l) found.add_one(v[l], q[l], true, raw[l], lo, hi);
            }
        }
    }
    lanes.finish(found);
    return found;
}

HOT static ErrorSums fake_quant_span(const float* x, float* out, int64_t n, float s, float z, float lo, float hi,
                                     bool monitor) {
    return quant_span<false>(x, out, n, &s, &z, lo, hi, monitor);
}

HOT static ErrorSums fake_quant_span_channels(const float* x, float* out, int64_t n, const float* s, const float* z,
                                              float lo, float hi, bool monitor) {
    return quant_span<true>(x, out, n, s, z, lo, hi, monitor);
}

}  // namespace

// Uniform fake quantization of a float32 CPU tensor in one parallel read, bit-identical to torch's ops. Per tensor
// (scale and zero_point of one element): x may have any layout without overlaps (the output gets the strides
// torch's ops give it). Per channel
// (C elements along `axis`): x must be contiguous; each run of `inner` elements has one channel's parameters.
// Returns [out] or, with monitor, [out, (clipped, sum (out - x)^2, sum x^2, max |out - x|) float64]; an empty list
// when the layout does not fit (the caller then uses torch's ops).
std::vector<torch::Tensor> fake_quant(torch::Tensor x, torch::Tensor scale, torch::Tensor zero_point, int64_t axis,
                                      double lo, double hi, bool monitor) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "float32 CPU tensor only");
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && zero_point.scalar_type() == torch::kFloat32 &&
                scale.is_contiguous() && zero_point.is_contiguous() && scale.numel() == zero_point.numel() &&
                scale.numel() >= 1, "float32 scale and zero point of one size");
    const int64_t C = scale.numel(), n = x.numel();
    int64_t inner = n;  // elements per run of one channel's parameters
    if (C > 1) {
        if (axis < 0 || axis >= x.dim() || x.size(axis) != C || !x.is_contiguous()) return {};
        inner = 1;
        for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
    } else if (!x.is_non_overlapping_and_dense()) {
        // a view with gaps (q of a fused qkv projection): copied into the dense layout torch's ops would give their
        // output (empty_like's: the same order of strides), one extra pass; overlapping views take torch's ops
        for (int64_t d = 0; d < x.dim(); ++d) {
            if (x.stride(d) == 0 && x.size(d) > 1) return {};
        }
        x = torch::empty_like(x).copy_(x);
        if (!x.is_non_overlapping_and_dense()) return {};
    }
    torch::Tensor out = torch::empty_like(x, at::MemoryFormat::Preserve);
    TORCH_CHECK(out.strides() == x.strides(), "the output did not get x's layout");
    // dense with non-negative strides: the elements fill [data, data + n) in some order, the same for out
    const float* px = x.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const float *ps = scale.data_ptr<float>(), *pz = zero_point.data_ptr<float>();
    // channels along the last dimensions (a Linear's input per channel: inner 1): runs of one channel are too
    // short to vectorise, so each row of C * inner elements is quantized with per-element scale and zero point
    const int64_t period = C * inner;
    if (C > 1 && inner < 4 * L && period <= (1 << 20) && n % period == 0) {
        std::vector<float> es(period), ez(period);
        for (int64_t j = 0; j < period; ++j) {
            es[j] = ps[j / inner];
            ez[j] = pz[j / inner];
        }
        const int64_t rows = n / period;
        const int64_t per_task = std::max<int64_t>(1, (1 << 15) / period);
        const int64_t tasks = (rows + per_task - 1) / per_task;
        std::vector<ErrorSums> found(tasks);
        const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
        {
            pybind11::gil_scoped_release no_gil;
            at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
                for (int64_t t = begin; t < end; ++t) {
                    ErrorSums acc;
                    for (int64_t r = t * per_task, stop = std::min(rows, (t + 1) * per_task); r < stop; ++r) {
                        acc.add(fake_quant_span_channels(px + r * period, po + r * period, period, es.data(),
                                                         ez.data(), flo, fhi, monitor));
                    }
                    found[t] = acc;
                }
            });
        }
        if (!monitor) return {out};
        ErrorSums all;
        for (const auto& f : found) all.add(f);
        return {out, all.tensor()};
    }
    const int64_t runs = inner > 0 ? n / inner : 0;
    const int64_t per_part = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(inner, 1));  // runs per task
    const int64_t parts = C > 1 ? (runs + per_part - 1) / per_part : std::max<int64_t>(1, std::min<int64_t>(
        at::get_num_threads() * 4, n / (1 << 15)));
    std::vector<ErrorSums> found(parts);
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p) {
                if (C == 1) {
                    const int64_t a = n * p / parts, b = n * (p + 1) / parts;
                    found[p] = fake_quant_span(px + a, po + a, b - a, ps[0], pz[0], flo, fhi, monitor);
                    continue;
                }
                ErrorSums acc;
                for (int64_t r = p * per_part, stop = std::min(runs, (p + 1) * per_part); r < stop; ++r) {
                    const int64_t c = r % C;
                    acc.add(fake_quant_span(px + r * inner, po + r * inner, inner, ps[c], pz[c], flo, fhi, monitor));
                }
                found[p] = acc;
            }
        });
    }
    if (!monitor) return {out};
    ErrorSums all;
    for (const auto& f : found) all.add(f);
    return {out, all.tensor()};
}

namespace {

// One row of a tile an explicit attention kernel computed: scores s [nk] and p = softmax(s) [nk] as torch computed
// them. With m = max s, z = sum exp(s - m) = 1 / max p: H = log z - sum p (s - m) (no log per key), max p, and the
// top-k mass summed from p itself. Keys in whole 16-lane vectors form chunks as in `row_sums` (lane l of a block of
// 16 vectors; their maxima are vertical maxima, no horizontal work); the k largest lie in chunks whose maximum
// reaches theta, the k-th largest of the 16 lane maxima (k <= 16) or of the chunk maxima, and in the last nk % 16
// keys. `cm` has room for the chunk maxima, `best` for k values.
HOT static void probs_row(const float* s, const float* p, int64_t nk, int64_t k, float* cm, float* best, float* ent,
                          float* mx, float* top) {
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t nv = nk / L, nblocks = (nv + L - 1) / L;
    vf vm = splat(-inf), vp = splat(-inf);
    vd ps{}, ps1{};  // sum p s and sum p in float64 lanes: one read, and p (s - m) = p s - m p stays exact
    for (int64_t b = 0; b < nblocks; ++b) {
        vf bm = splat(-inf);
        for (int64_t j = b * L, stop = std::min(nv, b * L + L); j < stop; ++j) {
            const vf a = load(s + j * L), x = load(p + j * L);
            vm = a > vm ? a : vm;
            bm = x > bm ? x : bm;
            const vd xd = __builtin_convertvector(x, vd);
            ps += xd * __builtin_convertvector(x > 0 ? a : splat(0.0f), vd);  // p = 0 (a key at -inf) adds 0
            ps1 += xd;
        }
        std::memcpy(cm + b * L, &bm, sizeof bm);
        vp = bm > vp ? bm : vp;
    }
    float lanes[L];
    std::memcpy(lanes, &vp, sizeof vp);
    float m = tree_reduce<float>(vm, true), pmax = tree_reduce<float>(vp, true);
    for (int64_t j = nv * L; j < nk; ++j) {
        m = s[j] > m ? s[j] : m;
        pmax = p[j] > pmax ? p[j] : pmax;
    }
    double sum_ps = tree_reduce<double>(ps, false), sum_p = tree_reduce<double>(ps1, false);
    for (int64_t j = nv * L; j < nk; ++j) {
        if (p[j] > 0) sum_ps += static_cast<double>(p[j]) * s[j];
        sum_p += p[j];
    }
    if (std::isnan(sum_p)) {  // a NaN or +inf score: torch's softmax of the row is NaN, no distribution
        *ent = *mx = *top = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    const double w = sum_ps - static_cast<double>(m) * sum_p;  // sum p (s - m)
    *ent = static_cast<float>(-std::log(static_cast<double>(pmax)) - w);
    *mx = pmax;
    if (k <= 0) {
        *top = 0.0f;
        return;
    }
    if (nk <= BLOCK) {
        float buf[BLOCK];
        const int64_t ld = (nk + L - 1) / L * L;
        std::memcpy(buf, p, sizeof(float) * nk);
        for (int64_t j = nk; j < ld; ++j) buf[j] = -inf;
        *top = static_cast<float>(topk_rounds(buf, ld, k, [](float x) { return static_cast<double>(x); }));
        return;
    }
    float theta = -inf;
    int64_t count = 0;
    if (nv > 0 && k <= L) {
        theta = kth_of_block(lanes, k);  // the 16 lane maxima are 16 different keys
    } else if (k <= nblocks * L && nv > 0) {
        for (int64_t c = 0; c < nblocks * L; ++c) push(best, count, k, cm[c]);
        theta = best[k - 1];
        count = 0;
    }
    for (int64_t b = 0; b < nblocks; ++b) {
        for (int64_t l = 0; l < L; ++l) {
            if (cm[b * L + l] < theta) continue;
            for (int64_t j = b * L, stop = std::min(nv, b * L + L); j < stop; ++j) {
                const float x = p[j * L + l];
                if (x >= theta) push(best, count, k, x);
            }
        }
    }
    for (int64_t j = nv * L; j < nk; ++j) {
        if (p[j] >= theta) push(best, count, k, p[j]);
    }
    double t = 0.0;
    for (int64_t i = 0; i < count; ++i) t += best[i];
    *top = static_cast<float>(t);
}

}  // namespace

// Statistics of every row of scores s [R, Nk] and probabilities p = softmax(s) [R, Nk] (contiguous float32 CPU,
// a tile a kernel already computed): (entropy, max_prob, topk_mass) [R], without another q k^T or exp.
std::vector<torch::Tensor> probs_stats(torch::Tensor s, torch::Tensor p, int64_t topk) {
    for (const auto* t : {&s, &p}) {
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->is_contiguous() && t->dim() == 2,
                    "contiguous float32 CPU [rows, keys] tensors only");
    }
    TORCH_CHECK(s.sizes() == p.sizes(), "scores and probabilities differ in shape");
    const int64_t R = s.size(0), nk = s.size(1), k = std::min(topk, nk);
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor ent = torch::empty({R}, opts), mx = torch::empty({R}, opts), top = torch::empty({R}, opts);
    const float *ps = s.data_ptr<float>(), *pp = p.data_ptr<float>();
    float *pe = ent.data_ptr<float>(), *pm = mx.data_ptr<float>(), *pt = top.data_ptr<float>();
    {
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, R, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(nk, 1)), [&](int64_t a, int64_t b) {
            std::vector<float> cm((nk / L + L - 1) / L * L + L), best(std::max<int64_t>(k, 1));
            for (int64_t r = a; r < b; ++r) {
                probs_row(ps + r * nk, pp + r * nk, nk, k, cm.data(), best.data(), pe + r, pm + r, pt + r);
            }
        });
    }
    return {ent, mx, top};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("probs_stats", &probs_stats, "entropy, max and top-k mass of rows a kernel already computed");
    m.def("fake_quant", &fake_quant, "uniform fake quantization, per tensor or channel (and its error sums), one read");
    m.def("quant_error", &quant_error, "clipped codes, squared error, squared reference and max error in one read");
    m.def("tensor_moments", &tensor_moments, "min, max, sum and sum of squares of a float32 tensor in one read");
    m.def("query_stats", &query_stats, "Exact per-query softmax statistics (entropy, max, top-k, segment mass)",
          pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("scale"), pybind11::arg("topk"),
          pybind11::arg("segments"), pybind11::arg("stats"), pybind11::arg("tile_elements"),
          pybind11::arg("v") = pybind11::none());
}
