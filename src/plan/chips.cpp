#include "plan/chips.h"

#include <algorithm>
#include <cctype>

namespace mxn {

const std::vector<ChipSpec>& chip_table() {
  // Vendors quote sparse peaks beside dense ones: these are the dense figures. Where public
  // figures disagree the source says which one is taken.
  static const std::vector<ChipSpec> table{
      {"H100-SXM", 989.4, 80, 3350,
       "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 dense; FP32 67)", 67},
      {"A100-SXM-80GB", 312, 80, 2039,
       "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB; FP32 19.5)", 19.5},
      {"H20", 148, 96, 4000,
       "NVIDIA HGX H20 as reported by the press (no public NVIDIA datasheet): 148 TFLOPS "
       "BF16, 44 FP32, 96 GB HBM3, 4.0 TB/s",
       44},
      {"MI300X", 1307.4, 192, 5300, "AMD Instinct MI300X datasheet (BF16 dense; FP32 matrix 163.4)",
       163.4},
      {"Ascend-910B", 280, 64, 1600,
       "Gitee AI's Ascend 910B page (280 TFLOPS FP16, 64 GB HBM2e); public bandwidth figures "
       "vary (0.4-1.6 TB/s), 1.6 TB/s taken; no FP32 figure published"},
      {"L40S", 362.05, 48, 864, "NVIDIA L40S datasheet (BF16 dense; FP32 91.6)", 91.6}};
  return table;
}

const ChipSpec* find_chip(const std::string& name) {
  auto lower = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
  };
  for (const ChipSpec& c : chip_table())
    if (lower(c.name) == lower(name)) return &c;
  return nullptr;
}

}  // namespace mxn
