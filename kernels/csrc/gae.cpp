// rlhf_fast::gae — generalised advantage estimation on CPU: one reverse loop per row, rows in parallel.
//
// rewards, values: (B, T) float32 or float64, contiguous, one dtype; mask: (B, T) bool, contiguous.
// delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where r and V count only
// on masked tokens and an off-mask token carries nothing backwards (the value after a row's last
// valid token is 0). Returns (advantages, returns = advantages + values), 0 off-mask, in the input dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace rlhf_fast {
namespace {

template <typename scalar_t>
void gae_rows(const scalar_t* rewards, const scalar_t* values, const bool* mask, scalar_t* adv,
              scalar_t* ret, int64_t B, int64_t T, double gamma, double lam) {
  const scalar_t g = static_cast<scalar_t>(gamma);
  const scalar_t gl = static_cast<scalar_t>(gamma * lam);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = b * T;
    scalar_t next_value = 0;
    scalar_t next_adv = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = row + t;
      if (!mask[i]) {
        adv[i] = 0;
        ret[i] = 0;
        next_value = 0;
        next_adv = 0;
        continue;
      }
      const scalar_t v = values[i];
      next_adv = rewards[i] + g * next_value - v + gl * next_adv;
      next_value = v;
      adv[i] = next_adv;
      ret[i] = next_adv + v;
    }
  }
}

void check_input(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu(), "rlhf_fast::gae: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "rlhf_fast::gae: ", name, " must be (B, T), got ", x.sizes());
  TORCH_CHECK(x.sizes() == like.sizes(), "rlhf_fast::gae: ", name, " ", x.sizes(),
              " must have the shape of rewards ", like.sizes());
  TORCH_CHECK(x.is_contiguous(), "rlhf_fast::gae: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                        const at::Tensor& mask, double gamma, double lam) {
  check_input(rewards, "rewards", rewards);
  check_input(values, "values", rewards);
  check_input(mask, "mask", rewards);
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "rlhf_fast::gae: rewards must be float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "rlhf_fast::gae: values dtype ",
              values.scalar_type(), " must match rewards dtype ", rewards.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "rlhf_fast::gae: mask must be bool, got ", mask.scalar_type());

  at::Tensor adv = at::empty_like(rewards);
  at::Tensor ret = at::empty_like(rewards);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_fast::gae", [&] {
    gae_rows<scalar_t>(rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
                       adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(), B, T, gamma, lam);
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &gae);
}

}  // namespace rlhf_fast
