// Floors of a float32 normalization's forward pass on this CPU, in C++: the time of kernels
// that do *less* than a normalization, each beside a copy of the same array. Built and run
// by benchmarks/floors.py (python -m benchmarks.bounds); prints one JSON object.
//
//   floors ROWS FEATURES BATCH_ROWS CHANNELS THREADS REPEATS
//
// Every probe works in place on a float32 array, its rows split evenly over THREADS threads
// (XLA:CPU's intra-op pool has one per core), vectors of 16 floats (GCC vector extensions):
//
//   copy             x = x + 1                          (the layer tables' roofline, x + 1)
//   read             sums of x and x^2 over every row   (one read of x, nothing written)
//   row_two_pass     per row: its sum, then row = row + c(sum) from L1 cache: the least a row
//                    kernel does when each output waits for its row's statistic
//   row_interleaved  the same, with the next row's sum taken in the loop that writes this row
//   row_layernorm    LayerNorm's arithmetic as normzoo's row kernel does it (sums shifted by
//                    the row's first element, then y = (x - mean) * (r * scale) + bias)
//   row_layernorm_l1 the same arithmetic over 4 rows that stay in L1 cache (padded so they
//                    are not 4 KiB apart, which would stall loads behind the stores of the
//                    row before), repeated to the same element count: the arithmetic's
//                    cost with no memory traffic at all
//   batch_two_pass   a (BATCH_ROWS, CHANNELS) array: every row's per-channel sums, all
//                    threads joined, then x = x + c(sums): BatchNorm in training, whose every
//                    output needs the statistics of all rows, minus its arithmetic
//
// Timing: a persistent pool of spinning threads; each repeat times every probe (in an order
// rotated per repeat) over 32 and then 64 runs back to back, the time per run the slope;
// medians over repeats. "layernorm_max_error" checks row_layernorm's arithmetic against a
// double-precision LayerNorm (so the probe does the work it claims to).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

// While a thread waits for the others: a spin that leaves the core's resources to them.
inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vfloat v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
inline vfloat splat(float v) { return vfloat{} + v; }

// A float32 matrix of `rows` x `cols`, 64-byte aligned (cols a multiple of kLanes), so
// no vector load straddles two cache lines.
struct Matrix {
  int64_t rows = 0, cols = 0;
  float* data = nullptr;
  float* row(int64_t r) const { return data + r * cols; }
};

Matrix zeros(int64_t rows, int64_t cols) {
  size_t bytes = (size_t(rows * cols) * sizeof(float) + 63) / 64 * 64;
  Matrix m{rows, cols, static_cast<float*>(std::aligned_alloc(64, bytes))};
  std::memset(m.data, 0, bytes);
  return m;
}

// ---------------------------------------------------------------------------- probes
// Each runs over rows [r0, r1) of m; `part` is the calling thread's index.

void copy_rows(const Matrix& m, int64_t r0, int64_t r1) {
  const vfloat one = splat(1.f);
  for (int64_t r = r0; r < r1; ++r) {
    float* p = m.row(r);
    for (int64_t j = 0; j < m.cols; j += kLanes) vstore(p + j, vload(p + j) + one);
  }
}

volatile float g_sink;  // results the compiler must not drop

void read_rows(const Matrix& m, int64_t r0, int64_t r1) {
  vfloat a0 = {}, a1 = {}, q0 = {}, q1 = {};
  for (int64_t r = r0; r < r1; ++r) {
    const float* p = m.row(r);
    for (int64_t j = 0; j < m.cols; j += 2 * kLanes) {
      vfloat u = vload(p + j), w = vload(p + j + kLanes);
      a0 += u;
      a1 += w;
      q0 += u * u;
      q1 += w * w;
    }
  }
  g_sink = hsum(a0 + a1 + q0 + q1);
}

inline float row_sum(const float* p, int64_t n) {
  vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t j = 0; j < n; j += 4 * kLanes) {
    a0 += vload(p + j);
    a1 += vload(p + j + kLanes);
    a2 += vload(p + j + 2 * kLanes);
    a3 += vload(p + j + 3 * kLanes);
  }
  return hsum((a0 + a1) + (a2 + a3));
}

// c(sum): a constant that depends on the sum (so the writes wait for it) and is ~1.
inline float tiny_dependence(float sum) { return 1.f + 1e-30f * sum; }

void row_two_pass(const Matrix& m, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* p = m.row(r);
    const vfloat c = splat(tiny_dependence(row_sum(p, m.cols)));
    for (int64_t j = 0; j < m.cols; j += kLanes) vstore(p + j, vload(p + j) + c);
  }
}

void row_interleaved(const Matrix& m, int64_t r0, int64_t r1) {
  float c = tiny_dependence(row_sum(m.row(r0), m.cols));
  for (int64_t r = r0; r < r1; ++r) {
    float* p = m.row(r);
    const float* next = r + 1 < r1 ? p + m.cols : p;
    const vfloat cv = splat(c);
    vfloat a0 = {}, a1 = {};
    for (int64_t j = 0; j < m.cols; j += 2 * kLanes) {
      a0 += vload(next + j);
      a1 += vload(next + j + kLanes);
      vfloat y0 = vload(p + j) + cv, y1 = vload(p + j + kLanes) + cv;
      vstore(p + j, y0);
      vstore(p + j + kLanes, y1);
    }
    c = tiny_dependence(hsum(a0 + a1));
  }
}

Matrix g_scale, g_bias;  // LayerNorm's scale and bias: one row of `features`
constexpr float kEpsilon = 1e-6f;

// LayerNorm of one row in place, the arithmetic of normzoo's row kernel: one pass of sums
// shifted by the row's first element (two chains per sum, lane totals added in double), then
// y = (x - mean) * (r * scale) + bias.
inline void layernorm_row(float* p, int64_t n, const float* scale, const float* bias) {
  const float shift = p[0];
  const vfloat k = splat(shift);
  vfloat a0 = {}, a1 = {}, q0 = {}, q1 = {};
  for (int64_t j = 0; j < n; j += 2 * kLanes) {
    vfloat d0 = vload(p + j) - k, d1 = vload(p + j + kLanes) - k;
    a0 += d0;
    a1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  const vfloat a = a0 + a1, q = q0 + q1;
  double s1 = 0.0, s2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s1 += a[l];
    s2 += q[l];
  }
  const double shifted_mean = s1 / double(n);
  const float mean = float(shift + shifted_mean);
  const float var = std::max(float(s2 / double(n) - shifted_mean * shifted_mean), 0.f);
  const float r = 1.f / std::sqrt(var + kEpsilon);
  const vfloat mv = splat(mean);
  for (int64_t j = 0; j < n; j += kLanes)
    vstore(p + j, (vload(p + j) - mv) * (r * vload(scale + j)) + vload(bias + j));
}

void row_layernorm(const Matrix& m, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) layernorm_row(m.row(r), m.cols, g_scale.data, g_bias.data);
}

constexpr int64_t kL1Rows = 4, kL1Pad = 32;
std::vector<Matrix> g_l1_rows;  // per thread: kL1Rows rows that stay in L1

void row_layernorm_l1(const Matrix& m, int64_t r0, int64_t r1, int part) {
  const Matrix& rows = g_l1_rows[part];  // rows of m.cols + kL1Pad: not 4 KiB apart
  for (int64_t r = r0; r < r1; ++r)
    layernorm_row(rows.row(r % kL1Rows), m.cols, g_scale.data, g_bias.data);
}

std::vector<Matrix> g_channel_sums;  // per thread: one sum per channel

void column_sums(const Matrix& m, int64_t r0, int64_t r1, int part) {
  float* out = g_channel_sums[part].data;
  for (int64_t c = 0; c < m.cols; c += 4 * kLanes) {  // 4 vectors of channels in registers
    vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = m.row(r) + c;
      a0 += vload(p);
      a1 += vload(p + kLanes);
      a2 += vload(p + 2 * kLanes);
      a3 += vload(p + 3 * kLanes);
    }
    vstore(out + c, a0);
    vstore(out + c + kLanes, a1);
    vstore(out + c + 2 * kLanes, a2);
    vstore(out + c + 3 * kLanes, a3);
  }
}

Matrix g_channel_shift;  // one row of `channels`

void add_channel_constants(const Matrix& m, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* p = m.row(r);
    for (int64_t c = 0; c < m.cols; c += kLanes)
      vstore(p + c, vload(p + c) + vload(g_channel_shift.data + c));
  }
}

// ---------------------------------------------------------------------------- pool

// Threads 1..T-1 spin on a generation counter; the caller is thread 0. run(f) returns when
// every thread has run f(part) once.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { loop(t); });
  }
  ~Pool() {
    stop_ = true;
    generation_.fetch_add(1, std::memory_order_release);
    for (auto& w : workers_) w.join();
  }
  void run(const std::function<void(int)>& f) {
    job_ = &f;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    f(0);
    while (done_.load(std::memory_order_acquire) != threads_ - 1) relax();
  }
  int threads() const { return threads_; }

 private:
  void loop(int part) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) relax();
      seen = g;
      if (stop_) return;
      (*job_)(part);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
  int threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<bool> stop_{false};
};

// Rows [r0, r1) of `rows` for thread `part` of `parts`.
inline void slab(int64_t rows, int part, int parts, int64_t* r0, int64_t* r1) {
  *r0 = rows * part / parts;
  *r1 = rows * (part + 1) / parts;
}

struct Probe {
  std::string name;
  const Matrix* m;
  std::function<void(Pool&)> run;
};

template <typename F>
std::function<void(Pool&)> per_slab(const Matrix& m, F f) {
  return [&m, f](Pool& pool) {
    pool.run([&](int part) {
      int64_t r0, r1;
      slab(m.rows, part, pool.threads(), &r0, &r1);
      f(m, r0, r1, part);
    });
  };
}

Matrix random_matrix(int64_t rows, int64_t cols, unsigned seed) {
  Matrix m = zeros(rows, cols);
  uint64_t state = seed;
  for (int64_t i = 0; i < rows * cols; ++i) {  // uniform in [-1, 1) plus a per-row offset
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    m.data[i] = float(int64_t(state >> 40) - (1 << 23)) / float(1 << 23) + 0.25f * float(i / cols % 4);
  }
  return m;
}

// Largest |LayerNorm(x) - layernorm_row(x)| over 8 rows of x, LayerNorm in double.
double layernorm_error(const Matrix& m) {
  double worst = 0.0;
  std::vector<float> row(m.cols);
  for (int64_t r = 0; r < std::min<int64_t>(8, m.rows); ++r) {
    std::memcpy(row.data(), m.row(r), m.cols * sizeof(float));
    double mean = 0.0, var = 0.0;
    for (int64_t j = 0; j < m.cols; ++j) mean += row[j];
    mean /= double(m.cols);
    for (int64_t j = 0; j < m.cols; ++j) var += (row[j] - mean) * (row[j] - mean);
    var /= double(m.cols);
    std::vector<float> x = row;
    layernorm_row(row.data(), m.cols, g_scale.data, g_bias.data);
    for (int64_t j = 0; j < m.cols; ++j) {
      double want = (x[j] - mean) / std::sqrt(var + kEpsilon) * g_scale.data[j] + g_bias.data[j];
      worst = std::max(worst, std::fabs(want - double(row[j])));
    }
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s ROWS FEATURES BATCH_ROWS CHANNELS THREADS REPEATS\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), features = std::atoll(argv[2]);
  const int64_t batch_rows = std::atoll(argv[3]), channels = std::atoll(argv[4]);
  const int threads = std::atoi(argv[5]), repeats = std::atoi(argv[6]);
  if (rows < 2 * threads || features <= 0 || features % (4 * kLanes) != 0 ||
      batch_rows < threads || channels <= 0 || channels % (4 * kLanes) != 0 || threads < 1 ||
      repeats < 1) {
    std::fprintf(stderr,
                 "floors: need ROWS >= 2 THREADS, FEATURES and CHANNELS multiples of %d, "
                 "BATCH_ROWS >= THREADS >= 1, REPEATS >= 1\n",
                 4 * kLanes);
    return 2;
  }
  g_scale = zeros(1, features);
  g_bias = zeros(1, features);
  for (int64_t j = 0; j < features; ++j) {
    g_scale.data[j] = 1.f + 1e-3f * float(j % 17);
    g_bias.data[j] = 1e-2f * float(j % 5);
  }
  const Matrix x = random_matrix(rows, features, 1), b = random_matrix(batch_rows, channels, 2);
  const double error = layernorm_error(x);
  for (int t = 0; t < threads; ++t) {
    g_l1_rows.push_back(zeros(kL1Rows, features + kL1Pad));
    for (int64_t r = 0; r < kL1Rows; ++r)
      std::memcpy(g_l1_rows.back().row(r), x.row(r), features * sizeof(float));
    g_channel_sums.push_back(zeros(1, channels));
  }
  g_channel_shift = zeros(1, channels);

  auto rows_only = [](void (*f)(const Matrix&, int64_t, int64_t)) {
    return [f](const Matrix& m, int64_t r0, int64_t r1, int) { f(m, r0, r1); };
  };
  std::vector<Probe> probes = {
      {"copy", &x, per_slab(x, rows_only(copy_rows))},
      {"read", &x, per_slab(x, rows_only(read_rows))},
      {"row_two_pass", &x, per_slab(x, rows_only(row_two_pass))},
      {"row_interleaved", &x, per_slab(x, rows_only(row_interleaved))},
      {"row_layernorm", &x, per_slab(x, rows_only(row_layernorm))},
      {"row_layernorm_l1", &x, per_slab(x, row_layernorm_l1)},
      {"batch_copy", &b, per_slab(b, rows_only(copy_rows))},
      {"batch_two_pass", &b, [&b, channels, rows_only](Pool& pool) {
         per_slab(b, column_sums)(pool);
         for (int64_t c = 0; c < channels; ++c) {
           float total = 0.f;
           for (const Matrix& part : g_channel_sums) total += part.data[c];
           g_channel_shift.data[c] = tiny_dependence(total);
         }
         per_slab(b, rows_only(add_channel_constants))(pool);
       }},
  };
  Pool pool(threads);
  // Runs of a probe back to back, as the layer tables' loops run (x + 1 over and over), and
  // the time per run the slope between n and 2n runs (what the first runs pay to bring the
  // array back into cache drops out): an array left alone for a few hundred µs loses much
  // of its L3 to the machine's other tenants, and a single copy after another probe then
  // takes ~3x its back-to-back time.
  constexpr int kRuns = 32;
  std::vector<std::vector<double>> times(probes.size());
  auto timed = [&pool](Probe& probe, int runs) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < runs; ++i) probe.run(pool);
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  for (int rep = 0; rep < repeats; ++rep) {
    for (size_t k = 0; k < probes.size(); ++k) {
      const size_t index = (k + rep) % probes.size();
      const double once = timed(probes[index], kRuns), twice = timed(probes[index], 2 * kRuns);
      times[index].push_back(std::max(twice - once, 0.5 * twice) / kRuns);
    }
  }
  std::printf("{\"threads\": %d, \"repeats\": %d, \"layernorm_max_error\": %.3g, \"probes\": {",
              threads, repeats, error);
  for (size_t k = 0; k < probes.size(); ++k) {
    std::vector<double>& t = times[k];
    std::sort(t.begin(), t.end());
    double median = t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
    std::printf("%s\"%s\": {\"rows\": %lld, \"cols\": %lld, \"us\": %.2f}", k ? ", " : "",
                probes[k].name.c_str(), (long long)probes[k].m->rows,
                (long long)probes[k].m->cols, median);
  }
  std::printf("}}\n");
  return 0;  // the buffers go with the process
}
