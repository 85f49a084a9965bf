// Member ids in error messages and member lists, shared by the manager's files.
#pragma once
#include <algorithm>
#include <string>
#include <vector>

namespace kevlarflow::comm {

inline std::string quoted(const std::string& s) { return "'" + s + "'"; }

inline std::string join(const std::vector<std::string>& xs) {
  std::string out;
  for (const auto& x : xs) out += (out.empty() ? "" : ", ") + quoted(x);
  return "[" + out + "]";
}

// Index of m in members, -1 if absent.
inline int index_of(const std::vector<std::string>& members, const std::string& m) {
  auto it = std::find(members.begin(), members.end(), m);
  return it == members.end() ? -1 : static_cast<int>(it - members.begin());
}

}  // namespace kevlarflow::comm
