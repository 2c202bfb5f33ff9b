// Float attention whose output is torch's own CPU flash attention, bit for bit, with the per-query statistics of
// every query taken on the way (entropy, max probability, top-k mass): one q k^T per call instead of two.
//
// torch's fused CPU kernel (ATen's cpu_flash_attention, float32, no mask, not causal) computes, for every
// (batch, head, block of qSplit query rows), over key blocks of 512: qk = k_blk q_blk^T by cpublas::gemm;
// per row, qk *= scale with the row's block maximum; then qk = exp_u20(qk - max) summed in vector lanes; the
// running max and sum are rescaled by exp(old max - new max), the output accumulator dst by the same factor;
// dst += qk v_blk by cpublas::gemm; at the end out = dst * (1 / sum). This file repeats that sequence of
// operations with the same ATen vector types, the same BLAS entry point, the same block sizes (qSplit 256 /
// 64 / 32 by query length, 512 keys) and the same buffer layout, so each output element is the same float.
// It must be compiled for the CPU capability ATen dispatches to (AVX512 / AVX2 / DEFAULT: the vector width
// decides the order of the lane sums); the Python side builds it for that capability and checks it against
// torch's kernel on probe shapes before using it.
//
// The statistics come from the same exp values: with t = scale * s - m (m the running max) and e = exp(t),
// z = sum e and w = sum e t are carried in float64 and rescaled when the max grows; entropy H = log z - w / z,
// max p = 1 / z; top-k mass = sum exp(s_top - m) / z over the row's k largest scaled scores: a row of one key
// block takes them from the few scores the exp pass sets aside (at or above the k-th largest lane maximum); a
// longer row keeps its k largest as they stream past (a vector compare against the k-th per vector of keys).
// exp_u20 is torch's (about 2 ulp): the statistics agree with the exact ones of `query_stats.cpp` to ~1e-6.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a, int* lda,
                       const float* b, int* ldb, float* beta, float* c, int* ldc);

namespace {

using at::native::TransposeType;

// ATen's float cpublas::gemm as libtorch runs it (that overload is not exported): the same normalisation of
// the leading dimensions, then the BLAS sgemm libtorch carries (MKL), else ATen's own kernel through its stub.
// Only used while float32 matmuls run at full precision (no oneDNN reduced-precision path).
void gemm(TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    const bool ta = transa != TransposeType::NoTranspose, tb = transb != TransposeType::NoTranspose;
    if (n == 1) ldc = m;  // ATen's normalize_last_dims
    if (ta ? m == 1 : k == 1) lda = ta ? k : m;
    if (tb ? k == 1 : n == 1) ldb = tb ? n : k;
    const bool blas = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                      ldc <= INT_MAX && lda >= std::max<int64_t>(1, ta ? k : m) &&
                      ldb >= std::max<int64_t>(1, tb ? n : k) && ldc >= std::max<int64_t>(1, m);
    TORCH_INTERNAL_ASSERT(blas, "flash_stats: a product BLAS cannot take (checked by the caller)");
    {
        int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
        char ta_ = ta ? 't' : 'n', tb_ = tb ? 't' : 'n';
        sgemm_(&ta_, &tb_, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
    }
}

using Vec = at::vec::Vectorized<float>;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// A row's k largest scaled scores so far, largest first; values enter only above the last one (`bar`), which after
// the first few keys of a row almost none do, so the check is one vector compare per 16 keys.
struct TopK {
    float* best;
    int64_t count;
    int64_t k;
    float bar() const { return count == k ? best[k - 1] : NEG_INF; }
    void push(float x) {
        if (count == k && !(x > best[k - 1])) return;
        int64_t pos = count < k ? count++ : k - 1;
        while (pos > 0 && best[pos - 1] < x) {
            best[pos] = best[pos - 1];
            pos--;
        }
        best[pos] = x;
    }
};

// The k-th largest of a vector's lanes, counting repeats (0 < k <= lanes): each lane ranked by how many lanes are
// larger, with no data-dependent branch; the smallest lane with fewer than k larger ones (NaN when a lane is NaN).
inline float kth_lane(const Vec& v, int64_t k) {
    float lanes[Vec::size()];
    v.store(lanes);
    Vec rank(0.f), rank2(0.f);  // two sums: half the dependency chain
    for (int64_t j = 0; j < Vec::size(); j += 2) {
        rank = rank + ((Vec(lanes[j]) > v) & Vec(1.f));
        rank2 = rank2 + ((Vec(lanes[j + 1]) > v) & Vec(1.f));
    }
    rank = rank + rank2;
    const Vec kept = Vec::blendv(Vec(std::numeric_limits<float>::infinity()), v, rank < Vec(static_cast<float>(k)));
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, kept);
}

// sum exp(c - m) over the k largest of the n candidates cand[0..n) (every candidate when n <= k); reorders cand.
// Up to a vector of candidates: the k-th largest by ranking, its copies counted up to k; more: nth_element.
inline float topk_exp_sum(float* cand, int64_t n, int64_t k, float m) {
    const int64_t W = Vec::size();
    const auto vsum_op = [](Vec& x, Vec& y) { return x + y; };
    if (k < n && n <= W) {
        const Vec c = Vec::set(Vec(NEG_INF), Vec::loadu(cand, n), n);
        const float kth = kth_lane(c, k);
        const Vec above = c > Vec(kth);
        const int64_t bigger = __builtin_popcount(~above.zero_mask() & static_cast<int>((1LL << W) - 1));
        return at::vec::vec_reduce_all<float>(vsum_op, Vec::blendv(Vec(0.f), (c - Vec(m)).exp(), above)) +
               static_cast<float>(k - bigger) * std::exp(kth - m);
    }
    if (n > k) std::nth_element(cand, cand + k - 1, cand + n, [](float x, float y) { return x > y; });
    float t = 0;
    for (int64_t i = 0; i < std::min(n, k); i += W) {
        const int64_t len = std::min(W, std::min(n, k) - i);
        const Vec e = (Vec::loadu(cand + i, len) - Vec(m)).exp();
        t += at::vec::vec_reduce_all<float>(vsum_op, Vec::set(Vec(0.f), e, len));
    }
    return t;
}

// row[i] *= scale; returns the max over the row (vector lanes, then the tail, as the fused kernel orders them);
// the scaled values are also offered to `top` (k > 0, `stream`); *lanes: the lane maxima (the tail not in them)
inline float scale_and_max(float* row, float scale, int64_t n, TopK& top, bool stream, Vec* lanes) {
    const int64_t W = Vec::size();
    const int full = static_cast<int>((1LL << W) - 1);
    const Vec vscale(scale);
    const bool want = top.k > 0 && stream;
    Vec vbar(want ? top.bar() : std::numeric_limits<float>::infinity());
    float tail_max = NEG_INF;
    Vec vmax(NEG_INF);
    int64_t i = 0;
    for (; i < W * (n / W); i += W) {
        Vec x = Vec::loadu(row + i) * vscale;
        vmax = at::vec::maximum(vmax, x);
        x.store(row + i);
        int above = ~(x > vbar).zero_mask() & full;
        if (above) {
            for (; above; above &= above - 1) top.push(row[i + __builtin_ctz(above)]);
            vbar = Vec(top.bar());
        }
    }
    for (; i < n; i++) {
        const float x = row[i] * scale;
        tail_max = std::max(tail_max, x);
        row[i] = x;
        if (want) top.push(x);
    }
    *lanes = vmax;
    // the vector maximum first: NaN there (a NaN score) is the row's max, as in torch's build
    return std::max(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax),
                    tail_max);
}

// row[i] = exp(row[i] - m); returns the float sum in the fused kernel's order; adds sum e * (row - m) to *w. With
// `cand`, the scores at or above `bound` are also set aside there (*ncand of them).
inline float exp_and_sum(float* row, float m, int64_t n, double* w, float bound = 0, float* cand = nullptr,
                         int64_t* ncand = nullptr) {
    const int64_t W = Vec::size();
    const int full = static_cast<int>((1LL << W) - 1);
    const Vec vm(m), vbound(bound), vninf(NEG_INF);
    Vec vsum(0.f);
    Vec vw(0.f);
    int64_t i = 0;
    for (; i < W * (n / W); i += W) {
        const Vec x = Vec::loadu(row + i);
        if (cand) {
            for (int above = ~(x >= vbound).zero_mask() & full; above; above &= above - 1) {
                cand[(*ncand)++] = row[i + __builtin_ctz(above)];
            }
        }
        const Vec t = x - vm;
        const Vec e = t.exp_u20();
        vsum += e;
        vw += (e * t) & (x != vninf);  // a key at -inf adds 0 (e is not exactly 0 there: exp_u20 clamps)
        e.store(row + i);
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    double wsum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vw);
    for (; i < n; i++) {
        if (cand && row[i] >= bound) cand[(*ncand)++] = row[i];
        const float t = row[i] - m;
        const float e = static_cast<float>(::exp(static_cast<double>(t)));  // torch's tail: C's double exp
        sum += e;
        if (row[i] != NEG_INF) wsum += static_cast<double>(e) * t;
        row[i] = e;
    }
    *w += wsum;
    return sum;
}

}  // namespace

// Whether every product of the call goes to BLAS as in torch's kernel: unit last strides and token strides of at
// least the head size (what a dense or qkv-split layout has), sizes within int.
bool usable(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
    if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
    const int64_t d = q.size(3);
    for (const auto& t : {q, k, v}) {
        if (t.scalar_type() != at::kFloat || !t.device().is_cpu() || t.stride(3) != 1 || t.size(3) != d) return false;
        if (t.stride(2) < std::max<int64_t>(d, 1) || t.stride(2) > INT_MAX || t.size(2) > INT_MAX) return false;
    }
    return q.size(0) == k.size(0) && k.size(0) == v.size(0) && q.size(1) == k.size(1) && k.size(1) == v.size(1) &&
           k.size(2) == v.size(2) && k.size(2) > 0 && q.size(2) > 0 && d > 0;
}

// q, k, v: [B, H, N, D] float32 CPU (any strides with unit last stride). scale < 0: 1 / sqrt(D) as torch takes it.
// Returns out [B, H, Nq, D] (a view of a [B, Nq, H, D] tensor, as torch's kernel returns it) and entropy, max_prob,
// topk_mass [B, H, Nq].
std::vector<torch::Tensor> flash_stats(torch::Tensor q_, torch::Tensor k_, torch::Tensor v_, double scale_arg,
                                       int64_t topk) {
    TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "q, k, v must be 4-D");
    TORCH_CHECK(q_.scalar_type() == at::kFloat && k_.scalar_type() == at::kFloat && v_.scalar_type() == at::kFloat,
                "float32 only");
    const at::Tensor query = q_.transpose(1, 2), key = k_.transpose(1, 2), value = v_.transpose(1, 2);
    const int64_t batchSize = query.size(0), qSize = query.size(1), num_head = query.size(2), headSize = query.size(3);
    const int64_t kvSize = value.size(1);
    TORCH_CHECK(key.size(3) == headSize && value.size(3) == headSize, "q/k/v head sizes differ");
    const float scaling_factor = static_cast<float>(
        scale_arg >= 0 ? scale_arg : 1.0 / std::sqrt(static_cast<double>(headSize)));

    const int64_t qStrideB = query.stride(0), qStrideM = query.stride(1), qStrideH = query.stride(2);
    const int64_t kStrideB = key.stride(0), kStrideN = key.stride(1), kStrideH = key.stride(2);
    const int64_t vStrideB = value.stride(0), vStrideN = value.stride(1), vStrideH = value.stride(2);
    TORCH_CHECK(usable(q_, k_, v_), "flash_stats: layout not supported");

    // laid out like q, as torch's kernel allocates it (dense in q's stride order)
    at::Tensor output = at::empty_like(q_);
    const int64_t oStrideB = output.stride(0), oStrideM = output.stride(2), oStrideH = output.stride(1);
    auto fopts = query.options();
    at::Tensor ent = at::empty({batchSize, num_head, qSize}, fopts);
    at::Tensor mxp = at::empty({batchSize, num_head, qSize}, fopts);
    at::Tensor top = at::empty({batchSize, num_head, qSize}, fopts);

    const int64_t q_split_size = qSize >= 768 ? 256 : qSize >= 192 ? 64 : 32;
    constexpr int64_t kv_split_size = 512;
    const int64_t qSplitSize = q_split_size > qSize ? qSize : q_split_size;
    const int64_t kvSplitSize = kv_split_size > kvSize ? kvSize : kv_split_size;
    const int64_t qSlice = (qSize + qSplitSize - 1) / qSplitSize;
    const int64_t num_thread = at::get_num_threads();
    const int64_t kk = std::min<int64_t>(std::max<int64_t>(topk, 0), kvSize);

    // per thread: qk [qSplit, kvSplit], max [qSplit], sum [qSplit], dst [qSplit, D] (the fused kernel's layout)
    const int64_t size_per_thread = qSplitSize * kvSplitSize + qSplitSize + qSplitSize + qSplitSize * headSize;
    at::Tensor buf = at::empty({num_thread, size_per_thread}, fopts);

    const float* q_data = query.const_data_ptr<float>();
    const float* k_data = key.const_data_ptr<float>();
    const float* v_data = value.const_data_ptr<float>();
    float* out_data = output.data_ptr<float>();
    float* buf_data = buf.data_ptr<float>();
    float* ent_data = ent.data_ptr<float>();
    float* mx_data = mxp.data_ptr<float>();
    float* top_data = top.data_ptr<float>();

    at::parallel_for(0, batchSize * num_head * qSlice, 1, [&](int64_t begin, int64_t end) {
        const int ompIdx = at::get_thread_num();
        float* qk_data = buf_data + ompIdx * size_per_thread;
        float* qk_max_data = qk_data + qSplitSize * kvSplitSize;
        float* qk_sum_data = qk_max_data + qSplitSize;
        float* dst_data = qk_sum_data + qSplitSize;
        std::vector<double> zs(qSplitSize), ws(qSplitSize);
        const int64_t per_row = std::max<int64_t>(kk, 1);
        // short rows (one key block): the top-k from the few scores at or above the k-th largest lane maximum (all
        // keys when k exceeds the lanes), set aside by the exp pass; longer rows keep a list as the blocks stream
        const bool short_rows = kk > 0 && kvSize <= kvSplitSize;
        std::vector<float> best(per_row * qSplitSize), cand(short_rows ? kvSize : 0);
        std::vector<double> tops(qSplitSize);
        std::vector<int64_t> counts(qSplitSize);

        for (int64_t z = begin; z < end; z++) {
            const int64_t kq = z % qSlice, j = (z / qSlice) % num_head, i = z / (qSlice * num_head);
            const int64_t m = kq * qSplitSize;
            const int64_t qBlockSize = std::min(qSplitSize, qSize - m);
            std::fill(qk_max_data, qk_max_data + qBlockSize, NEG_INF);
            std::fill(qk_sum_data, qk_sum_data + qBlockSize, 0.f);
            std::fill(zs.begin(), zs.begin() + qBlockSize, 0.0);
            std::fill(ws.begin(), ws.begin() + qBlockSize, 0.0);
            std::fill(counts.begin(), counts.begin() + qBlockSize, 0);
            std::fill(tops.begin(), tops.begin() + qBlockSize, 0.0);
            for (int64_t n = 0; n < kvSize; n += kvSplitSize) {
                const int64_t kvBlockSize = std::min(kvSplitSize, kvSize - n);
                gemm(TransposeType::Transpose, TransposeType::NoTranspose,
                                          kvBlockSize, qBlockSize, headSize, 1.f,
                                          k_data + i * kStrideB + j * kStrideH + n * kStrideN, kStrideN,
                                          q_data + i * qStrideB + j * qStrideH + m * qStrideM, qStrideM, 0.f,
                                          qk_data, kvBlockSize);
                for (int64_t row = 0; row < qBlockSize; ++row) {
                    float* r = qk_data + row * kvBlockSize;
                    TopK top{best.data() + row * per_row, counts[row], kk};
                    Vec lanes;
                    float tmp_max = scale_and_max(r, scaling_factor, kvBlockSize, top, !short_rows, &lanes);
                    counts[row] = top.count;
                    const float old_max = qk_max_data[row];
                    tmp_max = old_max > tmp_max ? old_max : tmp_max;
                    if (tmp_max == NEG_INF) {
                        std::fill(r, r + kvBlockSize, 0.f);
                        continue;
                    }
                    // the statistics' sums, moved to the new max: w' = a (w + (old - new) z), z' = a z
                    if (zs[row] > 0) {
                        const double shift = static_cast<double>(old_max) - tmp_max;
                        const double a = std::exp(shift);
                        ws[row] = a * (ws[row] + shift * zs[row]);
                        zs[row] *= a;
                    }
                    int64_t nc = 0;
                    const float bound = short_rows && kk <= Vec::size() ? kth_lane(lanes, kk) : NEG_INF;
                    const float tmp_sum = short_rows
                        ? exp_and_sum(r, tmp_max, kvBlockSize, &ws[row], bound, cand.data(), &nc)
                        : exp_and_sum(r, tmp_max, kvBlockSize, &ws[row]);
                    if (short_rows) tops[row] = topk_exp_sum(cand.data(), nc, kk, tmp_max);
                    zs[row] += tmp_sum;
                    const float exp_tmp = std::exp(old_max - tmp_max);
                    qk_sum_data[row] = tmp_sum + exp_tmp * qk_sum_data[row];
                    qk_max_data[row] = tmp_max;
                    if (n > 0) {
                        at::vec::map<float>([exp_tmp](Vec x) { return x * Vec(exp_tmp); },
                                            dst_data + row * headSize, dst_data + row * headSize, headSize);
                    }
                }
                gemm(TransposeType::NoTranspose, TransposeType::NoTranspose,
                                          headSize, qBlockSize, kvBlockSize, 1.f,
                                          v_data + i * vStrideB + j * vStrideH + n * vStrideN, vStrideN,
                                          qk_data, kvBlockSize, n == 0 ? 0.f : 1.f, dst_data, headSize);
            }
            for (int64_t row = 0; row < qBlockSize; ++row) {
                qk_sum_data[row] = qk_sum_data[row] == 0 ? 1 : qk_sum_data[row];
                const float sum_reciprocal = 1 / qk_sum_data[row];
                at::vec::map<float>([sum_reciprocal](Vec x) { return x * Vec(sum_reciprocal); },
                                    out_data + i * oStrideB + j * oStrideH + (m + row) * oStrideM,
                                    dst_data + row * headSize, headSize);
                const int64_t at = (i * num_head + j) * qSize + m + row;
                const double zz = zs[row], mx = qk_max_data[row];
                // no distribution: a NaN score or one at +inf (t = NaN made w NaN; the exp pass clamps NaN to a
                // number), or every key at -inf (z = 0)
                if (!(zz > 0) || std::isnan(ws[row])) {
                    ent_data[at] = mx_data[at] = top_data[at] = std::numeric_limits<float>::quiet_NaN();
                    continue;
                }
                ent_data[at] = static_cast<float>(std::log(zz) - ws[row] / zz);
                mx_data[at] = static_cast<float>(1.0 / zz);
                double t = tops[row];
                float* b = best.data() + row * per_row;
                for (int64_t c = 0; c < counts[row]; c++) t += std::exp(static_cast<double>(b[c]) - mx);
                top_data[at] = static_cast<float>(t / zz);
            }
        }
    });
    return {output, ent, mxp, top};
}

// torch.softmax over the last axis of one float32 row, bit for bit, as ATen's _vec_softmax_lastdim computes it
// (m = vec::reduce_all(maximum), e = vec::map((x - m).exp()), z = vec::reduce_all(+) over e, p = e * (1 / z)), with
// the row's statistics taken in the same passes. The exp pass sums w = sum e (s - m) beside z (H = log z - w / z,
// max p = 1 / z), in torch's lane order for z (first vector, then each next one, the tail merged into its lanes by
// Vec::set), so z is torch's z. Top-k: m's lane maxima are W different keys, so the k-th largest of them is at most
// the k-th largest score; the exp pass sets the few scores at or above it aside in `cand` (room for nk), and the
// k largest of those are the row's. Rows shorter than a vector take torch's own functions and scalar statistics.
inline void softmax_row(const float* s, float* p, int64_t nk, int64_t k, float* cand, float* ent, float* mxp,
                        float* topm) {
    const int64_t W = Vec::size(), nv = W * (nk / W);
    const auto vmax_op = [](Vec& x, Vec& y) { return at::vec::maximum(x, y); };
    const auto vsum_op = [](Vec& x, Vec& y) { return x + y; };
    float m, z;
    double w = 0;
    int64_t n = 0;  // candidates in `cand`
    if (nk < W) {
        m = at::vec::reduce_all<float>(vmax_op, s, nk);
        at::vec::map([m](Vec x) { return (x - Vec(m)).exp(); }, p, s, nk);
        z = at::vec::reduce_all<float>(vsum_op, p, nk);
        for (int64_t i = 0; i < nk; i++) w += p[i] == 0 ? 0.0 : static_cast<double>(p[i]) * (s[i] - m);
        if (k > 0) {  // every key is a candidate
            std::copy(s, s + nk, cand);
            n = nk;
        }
    } else {
        Vec acc = Vec::loadu(s);
        for (int64_t d = W; d < nv; d += W) acc = at::vec::maximum(acc, Vec::loadu(s + d));
        if (nk > nv) acc = Vec::set(acc, at::vec::maximum(acc, Vec::loadu(s + nv, nk - nv)), nk - nv);
        m = at::vec::vec_reduce_all<float>(vmax_op, acc);
        const Vec vbar(k == 0 ? std::numeric_limits<float>::infinity() : k <= W ? kth_lane(acc, k) : NEG_INF);
        const Vec vm(m), zero(0.f);
        Vec sum, vw(0.f);
        for (int64_t d = 0; d < nk; d += W) {
            const int64_t c = std::min(W, nk - d);
            const Vec x = c == W ? Vec::loadu(s + d) : Vec::loadu(s + d, c);
            const Vec t = x - vm;
            const Vec e = t.exp();
            if (c == W) {
                e.store(p + d);
                sum = d == 0 ? e : sum + e;
                vw += (e * t) & (e != zero);  // a key at -inf adds 0, not 0 * -inf
            } else {
                e.store(p + d, c);
                sum = Vec::set(sum, sum + e, c);
                vw = Vec::set(vw, vw + ((e * t) & (e != zero)), c);
            }
            for (int above = ~(x >= vbar).zero_mask() & static_cast<int>((1LL << c) - 1); above; above &= above - 1) {
                cand[n++] = s[d + __builtin_ctz(above)];
            }
            if ((d / W) % 16 == 15) {  // float lanes over 256 keys at most, then float64
                w += at::vec::vec_reduce_all<float>(vsum_op, vw);
                vw = Vec(0.f);
            }
        }
        w += at::vec::vec_reduce_all<float>(vsum_op, vw);
        z = at::vec::vec_reduce_all<float>(vsum_op, sum);
    }
    const float inv = 1 / z;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, p, p, nk);
    *ent = std::log(z) - static_cast<float>(w / z);
    *mxp = std::isnan(m) ? m : inv;  // the largest probability: exp(0) * (1 / z)
    const float t = k > 0 ? topk_exp_sum(cand, n, k, m) : 0.f;  // over the k largest candidates
    *topm = k == 0 ? 0.f : std::isnan(m) ? m : t * inv;
}

// torch.softmax(scores, -1) of float32 rows, bit for bit, with each row's entropy, max probability and top-k
// mass (`softmax_row`): a tiled kernel's statistics without a second read of its scores and probabilities.
// scores: [R, Nk] contiguous. Returns probs [R, Nk] and entropy, max_prob, topk_mass [R].
std::vector<torch::Tensor> softmax_stats(torch::Tensor scores, int64_t topk) {
    TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.device().is_cpu() && scores.is_contiguous() &&
                    scores.dim() == 2 && scores.size(1) > 0,
                "softmax_stats: contiguous float32 CPU [rows, keys] scores only");
    const int64_t R = scores.size(0), nk = scores.size(1);
    const int64_t kk = std::min<int64_t>(std::max<int64_t>(topk, 0), nk);
    at::Tensor probs = at::empty_like(scores);
    auto fopts = scores.options();
    at::Tensor ent = at::empty({R}, fopts), mxp = at::empty({R}, fopts), top = at::empty({R}, fopts);
    const float* s_data = scores.const_data_ptr<float>();
    float* p_data = probs.data_ptr<float>();
    float *ent_data = ent.data_ptr<float>(), *mx_data = mxp.data_ptr<float>(), *top_data = top.data_ptr<float>();
    // ATen's grain for this kernel (rows per task); the split does not change any row's values
    const int64_t grain = std::max<int64_t>(at::internal::GRAIN_SIZE / (16 * nk), 1);
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> cand(nk);
        for (int64_t r = begin; r < end; r++) {
            softmax_row(s_data + r * nk, p_data + r * nk, nk, kk, cand.data(), ent_data + r, mx_data + r, top_data + r);
        }
    });
    return {probs, ent, mxp, top};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("usable", &usable, "whether flash_stats takes these q, k, v");
    m.def("flash_stats", &flash_stats, "torch's CPU flash attention output, bit for bit, with per-query statistics",
          pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("scale"), pybind11::arg("topk"));
    m.def("softmax_stats", &softmax_stats, "torch.softmax over the last axis, bit for bit, with per-row statistics",
          pybind11::arg("scores"), pybind11::arg("topk"));
}
