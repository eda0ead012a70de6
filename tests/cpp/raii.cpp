// The header compiles as C++, and a small RAII wrapper makes a guarded call exception-safe:
// the reservation is released unless the call commits.
#include "aex.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace aex {

struct Error : std::runtime_error {
  aex_status status;
  std::string reason;
  Error(aex_status s, aex_error *e) : std::runtime_error(aex_error_message(e)), status(s), reason(aex_error_reason(e)) {
    aex_error_free(e);
  }
};

// Runs one aex call and throws its error. (The call must run before the error is read, so it
// is passed as a function, not as two arguments whose evaluation order C++ leaves open.)
template <class F>
void call(F f) {
  aex_error *e = nullptr;
  aex_status s = f(&e);
  if (s != AEX_OK) throw Error(s, e);
}

struct KernelDeleter {
  void operator()(aex_kernel *k) const { aex_kernel_free(k); }
};
using Kernel = std::unique_ptr<aex_kernel, KernelDeleter>;

struct String {
  char *p = nullptr;
  ~String() { aex_string_free(p); }
};

// Admits on construction; releases on destruction unless committed.
class Guard {
 public:
  Guard(aex_kernel *k, const char *token, const char *request) : k_(k) {
    call([&](aex_error **e) { return aex_kernel_admit(k, token, request, &adm_, e); });
  }
  ~Guard() {
    if (!settled_) aex_kernel_release(k_, aex_admission_execution_id(adm_), "scope exited", &last_, nullptr);
    aex_admission_free(adm_);
  }
  Guard(const Guard &) = delete;
  Guard &operator=(const Guard &) = delete;
  int64_t max_output_tokens() const { return aex_admission_max_output_tokens(adm_); }
  aex_settlement commit(int64_t input, int64_t output) {
    aex_usage u{input, output, 0};
    call([&](aex_error **e) { return aex_kernel_commit(k_, aex_admission_execution_id(adm_), &u, &last_, e); });
    settled_ = true;
    return last_;
  }

 private:
  aex_kernel *k_;
  aex_admission *adm_ = nullptr;
  aex_settlement last_{};
  bool settled_ = false;
};

}  // namespace aex

int main() {
  int failed = 0, passed = 0;
  auto expect = [&](bool ok, const char *what) {
    if (ok) passed++; else { failed++; std::fprintf(stderr, "failed: %s\n", what); }
  };
  aex_options *opts = aex_options_new();
  aex::call([&](aex_error **e) { return aex_options_set_config_yaml(opts, "models:\n  mini: {input_price: 0.15, output_price: 0.60}\n", e); });
  aex_kernel *raw = nullptr;
  aex::call([&](aex_error **e) { return aex_kernel_open(":memory:", opts, &raw, e); });
  aex_options_free(opts);
  aex::Kernel kernel(raw);
  aex::String token;
  aex::call([&](aex_error **e) { return aex_kernel_create_agent(kernel.get(), R"({"name": "cpp", "budget_micro": 1000})", &token.p, e); });
  const char *req = R"({"model": "mini", "input_tokens": 1000, "max_output_tokens": 500})";

  {
    aex::Guard call(kernel.get(), token.p, req);
    expect(call.max_output_tokens() == 500, "max_output_tokens");
    expect(call.commit(1000, 200).cost_micro == 270, "commit cost");
  }
  try {
    aex::Guard call(kernel.get(), token.p, req);
    throw std::runtime_error("the provider call failed");
  } catch (const std::runtime_error &) {
  }
  aex::String agent;
  aex::call([&](aex_error **e) { return aex_kernel_agent(kernel.get(), "cpp", &agent.p, e); });
  expect(std::strstr(agent.p, "\"reserved_micro\":0") != nullptr, "the failed call's reservation was released");
  expect(std::strstr(agent.p, "\"spent_micro\":270") != nullptr, "only the committed call was charged");
  try {
    aex::Guard a(kernel.get(), token.p, req);
    aex::Guard b(kernel.get(), token.p, req);
    expect(false, "the second reservation should not fit");
  } catch (const aex::Error &e) {
    expect(e.status == AEX_INSUFFICIENT_BUDGET && e.reason == "budget_exceeded", "402 as an exception");
  }
  std::printf("cpp-raii: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
