// The `cm` top-k cache codec, model version 2: the whole shard (context model + entropy coder) in one call
// each way (raydistill::topk_cm_encode / raydistill::topk_cm_decode; the Python side, header and CRCs are in
// raydistill/data/topk_cm.py, which describes the model).
//
// Per token, in shard order: [tail byte], anchor (the lower-median value code), one membership bit per
// vocabulary id in ascending order (stopping once k ids are set, or when every id left must be set), then
// the value code of each member in id order. Probabilities depend only on the shard header and the chunks
// of `chunk_tokens` tokens before the token's chunk (the counts are updated at the end of each chunk), as in
// version 1, but each symbol is coded on its own with an LZMA-style range coder (32-bit range, carry
// propagated in the encoder, byte output), so no grouping by probability class is needed: a membership bit
// is coded at its model probability on a 2^-16 grid, a categorical symbol at its counts (scaled to a total
// of 2^16). Integer arithmetic only: the encoder and the decoder compute identical models on every
// machine. The decoder bounds-checks every byte it reads: a stream that ends early or holds bytes past its
// last symbol is an error, never a read outside the buffer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace raydistill {
namespace cm {

constexpr int NB = 16, NCB = 4, NP = 4, NA = 16;  // value contexts (as model version 1)
constexpr int NCTX = NB * NCB * NP * NA;
constexpr uint32_t W_COUNT = 50;                 // categorical frequencies W * count + 1
constexpr uint32_t TOTAL = 1u << 16;             // a categorical's frequencies sum to this
constexpr uint32_t TOP = 1u << 24;               // the range is renormalised below this
constexpr int64_t MAX_TOKENS = (1 << 24) - 1;    // the uint32 code sums cannot overflow below this
constexpr int64_t MAX_ENTRIES = 0xFFFFFFFFll;    // nor the uint32 counts of a value context

// ------------------------------------------------------------------------------------------------
// range coder

struct Encoder {
  uint64_t low = 0;
  uint32_t range = 0xFFFFFFFFu;
  uint8_t cache = 0;
  uint64_t cache_size = 1;
  std::vector<uint8_t> out;

  void shift_low() {
    if (static_cast<uint32_t>(low) < 0xFF000000u || (low >> 32) != 0) {
      const uint8_t carry = static_cast<uint8_t>(low >> 32);
      uint8_t b = cache;
      do {
        out.push_back(static_cast<uint8_t>(b + carry));
        b = 0xFF;
      } while (--cache_size != 0);
      cache = static_cast<uint8_t>(static_cast<uint32_t>(low) >> 24);
    }
    cache_size++;
    low = (low & 0x00FFFFFFu) << 8;
  }
  void normalise() {
    while (range < TOP) {
      range <<= 8;
      shift_low();
    }
  }
  // a bit that is 1 with probability p1 / 2^16 (1 <= p1 < 2^16)
  void bit(bool b, uint32_t p1) {
    const uint32_t bound = (range >> 16) * p1;
    if (b) {
      range = bound;
    } else {
      low += bound;
      range -= bound;
    }
    normalise();
  }
  void symbol(uint32_t cum, uint32_t freq) {  // of a total of 2^16
    const uint32_t r = range >> 16;
    low += static_cast<uint64_t>(r) * cum;
    range = r * freq;
    normalise();
  }
  void flush() {
    for (int i = 0; i < 5; ++i) shift_low();
  }
};

// after a membership bit at `bound`: (rg, cd) = cd < bound ? (bound, cd) : (rg - bound, cd - bound). Two
// conditional moves on x86-64: GCC compiles the ?: form to a branch, which mispredicts at about every member
// (1 decision in 8), and arithmetic masks lengthen the coder's dependent chain.
inline void select_member(uint32_t& rg, uint32_t& cd, uint32_t bound) {
#if defined(__x86_64__) && defined(__GNUC__)
  uint32_t r = rg - bound, c = cd - bound;
  asm("cmpl %[b], %[cd]\n\tcmovbl %[b], %[r]\n\tcmovbl %[cd], %[c]"
      : [r] "+&r"(r), [c] "+&r"(c)
      : [b] "r"(bound), [cd] "r"(cd)
      : "cc");
  rg = r;
  cd = c;
#else
  const bool b = cd < bound;
  cd -= b ? 0 : bound;
  rg = b ? bound : rg - bound;
#endif
}

struct Decoder {
  const uint8_t* buf;
  int64_t len, pos = 0;
  bool overrun = false;
  uint32_t range = 0xFFFFFFFFu, code = 0, r = 0;

  Decoder(const uint8_t* b, int64_t n) : buf(b), len(n) {
    for (int i = 0; i < 5; ++i) code = (code << 8) | next();
  }
  uint32_t next() {
    if (pos < len) return buf[pos++];
    overrun = true;
    return 0;
  }
  void normalise() {
    while (range < TOP) {
      range <<= 8;
      code = (code << 8) | next();
    }
  }
  bool bit(uint32_t p1) {  // branch-free but for the renormalisation: members are hard to predict
    const uint32_t bound = (range >> 16) * p1;
    const bool b = code < bound;
    const uint32_t sub = b ? 0 : bound;
    code -= sub;
    range = b ? bound : range - bound;
    normalise();
    return b;
  }
  // a token's membership bits (probabilities p) from id 0 on while fewer than k are set and the ids left
  // can hold more than the rest; the members go to ids; returns the first id not decoded (when not all k are
  // set then, every id from it on is a member). The coder's state in locals for the loop: it is the hot one.
  int64_t bits(const uint16_t* p, int64_t* ids, int64_t V, int64_t k) {
    uint32_t rg = range, cd = code;
    int64_t set = 0, v = 0;
    for (; set < k && V - v > k - set; ++v) {
      const uint32_t bound = (rg >> 16) * p[v];
      const bool b = cd < bound;
      ids[set] = v;  // kept when the bit is set
      set += b;
      select_member(rg, cd, bound);
      while (rg < TOP) {
        rg <<= 8;
        cd = (cd << 8) | next();
      }
    }
    range = rg;
    code = cd;
    return set == k ? V : v;
  }
  // the cumulative frequency (of 2^16) the next symbol's interval holds (then `consume` that symbol)
  uint32_t target() {
    r = range >> 16;
    const uint32_t f = code / r;
    return f < TOTAL ? f : TOTAL - 1;  // f >= 2^16 only in a stream that is not ours
  }
  void consume(uint32_t cum, uint32_t freq) {
    code -= r * cum;
    range = r * freq;
    normalise();
  }
};

// ------------------------------------------------------------------------------------------------
// adaptive categoricals over n symbols, one per context: counts, and each context's frequency table (scaled
// to a total of 2^16) rebuilt when first used after an update. A table is one small block (a 64-entry
// lookup of the symbol at cumulative frequency i * 1024, then the n cumulative frequencies as uint16), so a
// symbol's decode touches one or two cache lines of it.

struct Categoricals {
  int n = 0;
  int64_t stride = 0;                 // uint16 entries per table: 32 (the lookup's 64 bytes) + n
  std::vector<uint32_t> counts;       // [context][symbol]
  std::vector<uint8_t> dirty;         // [context]
  std::vector<uint16_t> tables;       // [context][stride]

  void init(int size, int64_t contexts) {
    n = size;
    stride = 32 + size;
    counts.assign(contexts * size, 0);
    dirty.assign(contexts, 1);
    tables.assign(contexts * stride, 0);
  }
  void add(int64_t c, int s) {
    counts[c * n + s]++;
    dirty[c] = 1;
  }
  // frequencies (W count + 1) / T scaled to 2^16 by a fixed-point reciprocal, at least 1 each; the rounding
  // remainder goes to the first most frequent symbol
  void rebuild(int64_t c) {
    const uint32_t* cnt = counts.data() + c * n;
    uint16_t* cum = tables.data() + c * stride + 32;
    uint8_t* lut = reinterpret_cast<uint8_t*>(tables.data() + c * stride);
    uint64_t sum = 0;
    for (int s = 0; s < n; ++s) sum += cnt[s];
    const uint64_t T = W_COUNT * sum + static_cast<uint64_t>(n);
    const uint64_t mult = (uint64_t{1} << 48) / T;
    uint32_t freq[256];
    int64_t left = TOTAL;
    int top = 0;
    for (int s = 0; s < n; ++s) {
      freq[s] = static_cast<uint32_t>(std::max<uint64_t>(1, ((W_COUNT * cnt[s] + 1) * mult) >> 32));
      left -= freq[s];
      if (freq[s] > freq[top]) top = s;
    }
    freq[top] = static_cast<uint32_t>(static_cast<int64_t>(freq[top]) + left);
    uint32_t acc = 0;
    for (int s = 0; s < n; ++s) {
      cum[s] = static_cast<uint16_t>(acc);  // < 2^16: every later symbol has a frequency >= 1
      acc += freq[s];
    }
    int sym = 0;
    for (int i = 0; i < 64; ++i) {
      while (sym + 1 < n && cum[sym + 1] <= static_cast<uint32_t>(i) << 10) ++sym;
      lut[i] = static_cast<uint8_t>(sym);
    }
    dirty[c] = 0;
  }
  uint32_t upper(const uint16_t* cum, int s) const { return s + 1 < n ? cum[s + 1] : TOTAL; }
  void encode(Encoder& e, int64_t c, int s) {
    if (dirty[c]) rebuild(c);
    const uint16_t* cum = tables.data() + c * stride + 32;
    e.symbol(cum[s], upper(cum, s) - cum[s]);
  }
  int decode(Decoder& d, int64_t c) {
    if (dirty[c]) rebuild(c);
    const uint16_t* block = tables.data() + c * stride;
    const uint16_t* cum = block + 32;
    const uint32_t f = d.target();
    int s = reinterpret_cast<const uint8_t*>(block)[f >> 10];
    while (s + 1 < n && cum[s + 1] <= f) ++s;
    d.consume(cum[s], upper(cum, s) - cum[s]);
    return s;
  }
};

// ------------------------------------------------------------------------------------------------
// the context model (shared by the encoder and the decoder)

struct Model {
  int64_t V, L, K;
  bool has_tail;
  struct Pair {
    uint32_t count, sum;               // n(x, v) and the sum of v's codes after x (one cache line for both)
  };
  std::vector<Pair> cs;              // [x][v]
  std::vector<uint32_t> cn;          // n(x)
  std::vector<uint64_t> prior;       // 2 (q0[v] + 1): A p0(v) scaled by 65537
  std::vector<uint32_t> m0;          // the shard's mean code of v
  Categoricals tail, anchor, value;  // tail and anchor: one context each
  std::vector<uint16_t> prow;        // P(v | x) * 2^16 for the inputs seen in this chunk
  std::vector<int64_t> stamp;        // the chunk prow[x] was computed in (-1: never)
  int64_t chunk = 0;

  Model(int64_t V_, int64_t L_, int64_t K_, bool has_tail_, const int16_t* q0, const uint8_t* m0_)
      : V(V_), L(L_), K(K_), has_tail(has_tail_), cs(V_ * V_, Pair{0, 0}), cn(V_, 0), prior(V_),
        m0(V_), prow(V_ * V_), stamp(V_, -1) {
    for (int64_t v = 0; v < V; ++v) {
      prior[v] = 2 * (static_cast<uint64_t>(static_cast<uint16_t>(q0[v])) + 1);
      m0[v] = m0_[v];
    }
    tail.init(256, 1);
    anchor.init(static_cast<int>(L), 1);
    value.init(static_cast<int>(L), NCTX);
  }

  // P(v | x) = (n(x, v) + 2 p0(v)) / (n(x) + 2) on a 2^-16 grid, clamped to [1, 2^16 - 1]:
  // (n(x, v) 65537 + 2 (q0 + 1)) / ((n(x) + 2) 65537) times a fixed-point reciprocal (2^62 / D, shift 46)
  const uint16_t* member_p(int64_t x) {
    uint16_t* row = prow.data() + x * V;
    if (stamp[x] == chunk) return row;
    stamp[x] = chunk;
    const uint64_t D = (static_cast<uint64_t>(cn[x]) + 2) * 65537u;
    const uint64_t M = (uint64_t{1} << 62) / D;
    const Pair* c = cs.data() + x * V;
    for (int64_t v = 0; v < V; ++v) {
      const uint64_t num = static_cast<uint64_t>(c[v].count) * 65537u + prior[v];  // < D
      const uint64_t q = (num * M) >> 46;                                    // < 2^16
      row[v] = static_cast<uint16_t>(q < 1 ? 1 : q);
    }
    return row;
  }

  // the value context of id v after x (P(v | x) on the 2^-16 grid: p, the token's anchor: a)
  int value_ctx(int64_t x, int64_t v, uint32_t p, int a) const {
    const Pair& e = cs[x * V + v];
    const uint64_t cnt = e.count;
    // pb = min(floor(predicted code * NB / L), NB - 1), the predicted code (s1 + m0) / (cnt + 1): a binary
    // search instead of a division
    const uint64_t num = (static_cast<uint64_t>(e.sum) + m0[v]) * NB, den = (cnt + 1) * static_cast<uint64_t>(L);
    uint64_t pb = 0;
    for (uint64_t step = NB / 2; step > 0; step >>= 1) pb += num >= (pb + step) * den ? step : 0;
    const int cb = (cnt >= 1) + (cnt >= 3) + (cnt >= 7);
    const int qb = (p < 32768) + (p < 16384) + (p < 8192);
    const int ab = std::min(a, NA - 1);
    return ((static_cast<int>(pb) * NCB + cb) * NP + qb) * NA + ab;
  }

  // the counts of tokens [a, b) (their ids, codes, anchors, tails and value contexts), then a new chunk
  void update(int64_t a, int64_t b, const int64_t* x, const int64_t* idx, const uint8_t* codes,
              const int32_t* anchors, const uint8_t* tails, const uint16_t* ctx) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t xt = x[t];
      cn[xt]++;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t f = xt * V + idx[t * K + j];
        cs[f].count++;
        cs[f].sum += codes[t * K + j];
        value.add(ctx[(t - a) * K + j], codes[t * K + j]);
      }
      anchor.add(0, anchors[t - a]);
      if (has_tail) tail.add(0, tails[t]);
    }
    chunk++;
  }
};

void check_inputs(const at::Tensor& x, const at::Tensor& q0, const at::Tensor& m0, int64_t n, int64_t k, int64_t V,
                  int64_t levels, int64_t chunk_tokens) {
  TORCH_CHECK(V >= 1 && V <= 4096, "topk_cm: vocab_size must be in [1, 4096], got ", V);
  TORCH_CHECK(k >= 1 && k <= V, "topk_cm: k must be in [1, vocab_size=", V, "], got ", k);
  TORCH_CHECK(levels >= 2 && levels <= 256, "topk_cm: levels must be in [2, 256], got ", levels);
  TORCH_CHECK(chunk_tokens >= 1, "topk_cm: chunk_tokens must be >= 1, got ", chunk_tokens);
  TORCH_CHECK(n >= 0 && n <= MAX_TOKENS && n * k <= MAX_ENTRIES, "topk_cm: a shard holds at most ", MAX_TOKENS,
              " tokens and ", MAX_ENTRIES, " entries (tokens x k), got ", n, " x ", k);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.dim() == 1 && x.numel() == n &&
                  x.is_contiguous(),
              "topk_cm: inputs must be a contiguous int64 CPU tensor of ", n, " input ids");
  TORCH_CHECK(q0.device().is_cpu() && q0.scalar_type() == at::kShort && q0.numel() == V && q0.is_contiguous(),
              "topk_cm: q0 must be a contiguous int16 CPU tensor of vocab_size=", V, " entries");
  TORCH_CHECK(m0.device().is_cpu() && m0.scalar_type() == at::kByte && m0.numel() == V && m0.is_contiguous(),
              "topk_cm: m0 must be a contiguous uint8 CPU tensor of vocab_size=", V, " entries");
  const int64_t* xp = x.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(xp[t] >= 0 && xp[t] < V, "topk_cm: input id ", xp[t], " of token ", t, " outside [0, ", V, ")");
  const uint8_t* mp = m0.data_ptr<uint8_t>();
  for (int64_t v = 0; v < V; ++v)
    TORCH_CHECK(mp[v] < levels, "topk_cm: header mean code ", int(mp[v]), " of id ", v, " >= levels=", levels);
}

int lower_median(const uint8_t* codes, int64_t k) {
  uint32_t hist[256] = {0};
  for (int64_t j = 0; j < k; ++j) hist[codes[j]]++;
  const int64_t rank = (k - 1) / 2;  // the rank-th smallest
  int64_t seen = 0;
  for (int c = 0; c < 256; ++c) {
    seen += hist[c];
    if (seen > rank) return c;
  }
  return 255;
}

// ------------------------------------------------------------------------------------------------
// the ops

at::Tensor topk_cm_encode(const at::Tensor& idx_t, const at::Tensor& codes_t, const at::Tensor& tail_t,
                          const at::Tensor& x_t, const at::Tensor& q0_t, const at::Tensor& m0_t, int64_t V,
                          int64_t levels, int64_t chunk_tokens, bool has_tail) {
  const int64_t n = idx_t.dim() == 2 ? idx_t.size(0) : -1, k = idx_t.dim() == 2 ? idx_t.size(1) : -1;
  TORCH_CHECK(n >= 0, "topk_cm_encode: ids must be (n, k), got ", idx_t.sizes());
  check_inputs(x_t, q0_t, m0_t, n, k, V, levels, chunk_tokens);
  TORCH_CHECK(idx_t.device().is_cpu() && idx_t.scalar_type() == at::kLong && idx_t.is_contiguous(),
              "topk_cm_encode: ids must be a contiguous int64 CPU tensor");
  TORCH_CHECK(codes_t.device().is_cpu() && codes_t.scalar_type() == at::kByte && codes_t.is_contiguous() &&
                  codes_t.sizes() == idx_t.sizes(),
              "topk_cm_encode: codes must be a contiguous uint8 CPU tensor shaped like the ids ", idx_t.sizes());
  TORCH_CHECK(!has_tail || (tail_t.device().is_cpu() && tail_t.scalar_type() == at::kByte &&
                            tail_t.is_contiguous() && tail_t.numel() == n),
              "topk_cm_encode: tail must be a contiguous uint8 CPU tensor of ", n, " codes");
  const int64_t* idx = idx_t.data_ptr<int64_t>();
  const uint8_t* codes = codes_t.data_ptr<uint8_t>();
  const uint8_t* tails = has_tail ? tail_t.data_ptr<uint8_t>() : nullptr;
  const int64_t* x = x_t.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t v = idx[t * k + j];
      TORCH_CHECK(v >= 0 && v < V && (j == 0 || v > idx[t * k + j - 1]), "topk_cm_encode: token ", t,
                  ": ids must be strictly ascending in [0, ", V, "), got ", v, " at position ", j);
      TORCH_CHECK(codes[t * k + j] < levels, "topk_cm_encode: token ", t, ": value code ", int(codes[t * k + j]),
                  " >= levels=", levels);
    }
  }

  Model model(V, levels, k, has_tail, q0_t.data_ptr<int16_t>(), m0_t.data_ptr<uint8_t>());
  Encoder enc;
  enc.out.reserve(static_cast<size_t>(n) * 96 + 16);
  std::vector<uint16_t> ctx(static_cast<size_t>(std::min(chunk_tokens, std::max<int64_t>(n, 1)) * k));
  std::vector<int32_t> anchors(ctx.size() / k);
  for (int64_t a = 0; a < n; a += chunk_tokens) {
    const int64_t b = std::min(n, a + chunk_tokens);
    for (int64_t t = a; t < b; ++t) {
      const int64_t* ids = idx + t * k;
      const uint8_t* cc = codes + t * k;
      if (has_tail) model.tail.encode(enc, 0, tails[t]);
      const int anc = lower_median(cc, k);
      anchors[t - a] = anc;
      model.anchor.encode(enc, 0, anc);
      const uint16_t* p = model.member_p(x[t]);
      int64_t set = 0;
      for (int64_t v = 0; v < V && set < k && V - v > k - set; ++v) {
        const bool member = ids[set] == v;
        enc.bit(member, p[v]);
        set += member;
      }
      for (int64_t j = 0; j < k; ++j) {
        const int c = model.value_ctx(x[t], ids[j], p[ids[j]], anc);
        ctx[(t - a) * k + j] = static_cast<uint16_t>(c);
        model.value.encode(enc, c, cc[j]);
      }
    }
    model.update(a, b, x, idx, codes, anchors.data(), tails, ctx.data());
  }
  enc.flush();
  at::Tensor out = at::empty({static_cast<int64_t>(enc.out.size())}, at::kByte);
  if (!enc.out.empty()) std::memcpy(out.data_ptr<uint8_t>(), enc.out.data(), enc.out.size());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_cm_decode(const at::Tensor& body_t, const at::Tensor& x_t,
                                                              const at::Tensor& q0_t, const at::Tensor& m0_t,
                                                              int64_t n, int64_t k, int64_t V, int64_t levels,
                                                              int64_t chunk_tokens, bool has_tail) {
  check_inputs(x_t, q0_t, m0_t, n, k, V, levels, chunk_tokens);
  TORCH_CHECK(body_t.device().is_cpu() && body_t.scalar_type() == at::kByte && body_t.dim() == 1 &&
                  body_t.is_contiguous(),
              "topk_cm_decode: the stream must be a contiguous 1-d uint8 CPU tensor");
  at::Tensor idx_t = at::empty({n, k}, at::kLong);
  at::Tensor codes_t = at::empty({n, k}, at::kByte);
  at::Tensor tail_t = at::empty({has_tail ? n : 0}, at::kByte);
  int64_t* idx = idx_t.data_ptr<int64_t>();
  uint8_t* codes = codes_t.data_ptr<uint8_t>();
  uint8_t* tails = has_tail ? tail_t.data_ptr<uint8_t>() : nullptr;
  const int64_t* x = x_t.data_ptr<int64_t>();

  Model model(V, levels, k, has_tail, q0_t.data_ptr<int16_t>(), m0_t.data_ptr<uint8_t>());
  Decoder dec(body_t.data_ptr<uint8_t>(), body_t.numel());
  std::vector<uint16_t> ctx(static_cast<size_t>(std::min(chunk_tokens, std::max<int64_t>(n, 1)) * k));
  std::vector<int32_t> anchors(ctx.size() / k);
  for (int64_t a = 0; a < n; a += chunk_tokens) {
    const int64_t b = std::min(n, a + chunk_tokens);
    for (int64_t t = a; t < b; ++t) {
      int64_t* ids = idx + t * k;
      uint8_t* cc = codes + t * k;
      if (has_tail) tails[t] = static_cast<uint8_t>(model.tail.decode(dec, 0));
      const int anc = model.anchor.decode(dec, 0);
      anchors[t - a] = anc;
      const uint16_t* p = model.member_p(x[t]);
      const int64_t v = dec.bits(p, ids, V, k);
      for (int64_t u = v, set = k - (V - v); set < k; ++u) ids[set++] = u;  // every id left is a member
      for (int64_t j = 0; j < k; ++j) {
        const int c = model.value_ctx(x[t], ids[j], p[ids[j]], anc);
        ctx[(t - a) * k + j] = static_cast<uint16_t>(c);
        cc[j] = static_cast<uint8_t>(model.value.decode(dec, c));
      }
      TORCH_CHECK(!dec.overrun, "topk_cm_decode: the stream ends inside token ", t, " of ", n,
                  " (truncated, or coded with other parameters: k, tail, vocabulary, levels, chunk_tokens)");
    }
    model.update(a, b, x, idx, codes, anchors.data(), tails, ctx.data());
  }
  TORCH_CHECK(!dec.overrun && dec.pos == dec.len, "topk_cm_decode: ", n, " tokens decoded from ", dec.pos,
              " of the stream's ", dec.len, " bytes", dec.overrun ? " (it ends early: truncated?)" : "",
              " (corrupted, or coded with other parameters: k, tail, vocabulary, levels, chunk_tokens)");
  return {idx_t, codes_t, tail_t};
}

}  // namespace cm
}  // namespace raydistill

TORCH_LIBRARY_FRAGMENT(raydistill, m) {
  m.def(
      "topk_cm_encode(Tensor ids, Tensor codes, Tensor tail, Tensor inputs, Tensor q0, Tensor m0, int vocab_size, "
      "int levels, int chunk_tokens, bool has_tail) -> Tensor");
  m.def(
      "topk_cm_decode(Tensor stream, Tensor inputs, Tensor q0, Tensor m0, int n, int k, int vocab_size, int levels, "
      "int chunk_tokens, bool has_tail) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(raydistill, CPU, m) {
  m.impl("topk_cm_encode", &raydistill::cm::topk_cm_encode);
  m.impl("topk_cm_decode", &raydistill::cm::topk_cm_decode);
}
