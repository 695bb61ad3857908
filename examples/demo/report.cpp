// The demo's report: Markdown table (printed and written), CSV, and a gnuplot PNG of accuracy vs size.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "demo.hpp"
#include "lycoris/error.hpp"

namespace lycoris::demo {

namespace {

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// 12345 → "12 345" (readable parameter counts)
std::string grouped(int64_t n) {
  std::string s = std::to_string(n), out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i > 0 && (s.size() - i) % 3 == 0) out += ' ';
    out += s[i];
  }
  return out;
}

std::string size_str(int64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes) + " B";
  if (bytes < 1024 * 1024) return fmt("%.1f KiB", static_cast<double>(bytes) / 1024);
  return fmt("%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
}

void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw IOError(tmp + ": cannot write");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw IOError(path + ": cannot rename " + tmp + " (" + ec.message() + ")");
}

bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

std::string markdown_table(const BaseInfo& base, const std::vector<AlgoResult>& rows) {
  // data-parallel runs add the speed-up over one process and the step share spent waiting for all-reduces
  const bool parallel = std::any_of(rows.begin(), rows.end(), [](const AlgoResult& r) { return r.processes > 1; });
  std::ostringstream md;
  md << "| algorithm | settings | trainable params | adapter file | ms/step | new-class acc | "
        "old-class acc (merged) | old acc among 0–4 | max abs(merged − unmerged) |"
     << (parallel ? " speed-up vs 1 process | all-reduce share |" : "") << "\n"
     << "|---|---|--:|--:|--:|--:|--:|--:|--:|" << (parallel ? "--:|--:|" : "") << "\n";
  md << "| base (no adapter) | pretrained on 0–4 | " << grouped(base.parameters) << " (frozen) | "
     << size_str(base.file_bytes) << " | – | " << fmt("%.3f", base.new_acc) << " | " << fmt("%.3f", base.old_acc)
     << " | " << fmt("%.3f", base.old_acc) << " | – |" << (parallel ? " – | – |" : "") << "\n";
  for (const auto& r : rows) {
    md << "| " << r.label << " | " << r.settings << " | " << grouped(r.trainable) << " | " << size_str(r.file_bytes)
       << " | " << fmt("%.1f", r.ms_per_step) << " | " << fmt("%.3f", r.new_acc) << " | " << fmt("%.3f", r.old_acc)
       << " | " << fmt("%.3f", r.old_acc_within) << " | " << fmt("%.1e", r.max_diff) << " |";
    if (parallel)
      md << " " << fmt("%.2fx", r.one_process_ms_per_step / std::max(r.ms_per_step, 1e-9)) << " | "
         << fmt("%.1f %%", 100 * r.all_reduce_ms_per_step / std::max(r.ms_per_step, 1e-9)) << " |";
    md << "\n";
  }
  return md.str();
}

std::string csv_table(const std::vector<AlgoResult>& rows) {
  std::ostringstream csv;
  csv << "algorithm,algo,settings,trainable_params,adapted_modules,adapter_bytes,ms_per_step,new_class_acc,"
         "new_class_acc_merged,old_class_acc_merged,old_class_acc_among_old,max_abs_merged_minus_unmerged,"
         "final_loss,seconds,processes,one_process_ms_per_step,all_reduce_ms_per_step\n";
  for (const auto& r : rows)
    csv << r.label << ',' << r.algo << ",\"" << r.settings << "\"," << r.trainable << ',' << r.modules << ','
        << r.file_bytes << ',' << fmt("%.3f", r.ms_per_step) << ',' << fmt("%.4f", r.new_acc) << ','
        << fmt("%.4f", r.new_acc_merged) << ',' << fmt("%.4f", r.old_acc) << ',' << fmt("%.4f", r.old_acc_within)
        << ',' << fmt("%.3e", r.max_diff) << ',' << fmt("%.4f", r.final_loss) << ',' << fmt("%.1f", r.seconds)
        << ',' << r.processes << ',' << fmt("%.3f", r.one_process_ms_per_step) << ','
        << fmt("%.3f", r.all_reduce_ms_per_step) << '\n';
  return csv.str();
}

std::string write_report(const std::string& out_dir, const BaseInfo& base, const std::vector<AlgoResult>& rows) {
  namespace fs = std::filesystem;
  write_text((fs::path(out_dir) / "results.md").string(), markdown_table(base, rows));
  write_text((fs::path(out_dir) / "results.csv").string(), csv_table(rows));
  if (rows.empty()) return "";
  if (!have_gnuplot()) {
    std::fprintf(stderr, "note: gnuplot not found, no plot (sudo apt-get install -y gnuplot-nox)\n");
    return "";
  }
  // x = adapter file size (KiB, log scale); y = new-class accuracy and old-class accuracy among 0–4.
  std::ostringstream dat;
  for (const auto& r : rows)
    dat << '"' << r.label << "\" " << fmt("%.3f", static_cast<double>(r.file_bytes) / 1024.0) << ' '
        << fmt("%.4f", r.new_acc) << ' ' << fmt("%.4f", r.old_acc_within) << '\n';
  const std::string dat_path = (fs::path(out_dir) / "accuracy_vs_size.dat").string();
  const std::string png_path = (fs::path(out_dir) / "accuracy_vs_size.png").string();
  const std::string gp_path = (fs::path(out_dir) / "accuracy_vs_size.gp").string();
  write_text(dat_path, dat.str());
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1000,640 font 'sans,11'\n"
     << "set output '" << png_path << "'\n"
     << "set title 'LyCORIS adapters on Fashion-MNIST: base pretrained on classes 0-4, adapted to 5-9'\n"
     << "set xlabel 'adapter file size (KiB, log scale)'\n"
     << "set ylabel 'test accuracy'\n"
     << "set logscale x\n"
     << "set yrange [0:1.05]\n"
     << "set grid\n"
     << "set key bottom right\n"
     << "plot '" << dat_path << "' using 2:3 with points pt 7 ps 1.5 title 'new classes 5-9 (10-way, adapter applied)', \\\n"
     << "     '' using 2:3:1 with labels offset 0,1 font 'sans,9' notitle, \\\n"
     << "     '' using 2:4 with points pt 5 ps 1.2 title 'old classes 0-4, argmax among 0-4 (merged)'\n";
  write_text(gp_path, gp.str());
  if (std::system(("gnuplot " + shell_quote(gp_path) + " 2>/dev/null").c_str()) != 0) {
    // pngcairo missing: fall back to the libgd png terminal
    auto script = gp.str();
    script.replace(script.find("pngcairo"), 8, "png");
    write_text(gp_path, script);
    if (std::system(("gnuplot " + shell_quote(gp_path)).c_str()) != 0) {
      std::fprintf(stderr, "note: gnuplot failed, no plot (script: %s)\n", gp_path.c_str());
      return "";
    }
  }
  return png_path;
}

}  // namespace lycoris::demo
