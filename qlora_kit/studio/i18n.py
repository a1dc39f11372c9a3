"""The page's words in English and Chinese. app.py registers each translatable label/value with its key here; the
language switch re-sends them all. A key missing from one language falls back to English."""

from __future__ import annotations

LANGUAGES = {"English": "en", "中文": "zh"}

TEXTS: dict[str, dict[str, str]] = {
    "title": {"en": "qlora_kit studio", "zh": "qlora_kit 工作室"},
    "intro": {"en": "Fine-tune a reasoning model with QLoRA, one screen at a time. Every action runs the same "
                    "`qlora-kit` command you could type; the run directory is an ordinary one.",
              "zh": "一步一屏，用 QLoRA 微调推理模型。每个操作都运行你也可以自己输入的 `qlora-kit` 命令；"
                    "运行目录与命令行完全相同。"},
    "language": {"en": "Language", "zh": "语言"},
    "tab_model": {"en": "1 · Model & data", "zh": "1 · 模型与数据"},
    "tab_settings": {"en": "2 · Settings & fit", "zh": "2 · 设置与显存"},
    "tab_train": {"en": "3 · Train", "zh": "3 · 训练"},
    "tab_results": {"en": "4 · Results", "zh": "4 · 结果"},
    "tab_chat": {"en": "5 · Chat", "zh": "5 · 对话"},
    "tab_export": {"en": "6 · Export", "zh": "6 · 导出"},
    "preset": {"en": "Start from", "zh": "从此开始"},
    "model_name": {"en": "Model: a hub id, a local folder or a .gguf file",
                   "zh": "模型：Hub ID、本地文件夹或 .gguf 文件"},
    "data_source": {"en": "Data: a file in the workspace or a hub data set id",
                    "zh": "数据：工作区中的文件或 Hub 数据集 ID"},
    "upload": {"en": "…or upload a .jsonl / .json / .csv / .parquet file",
               "zh": "……或上传 .jsonl / .json / .csv / .parquet 文件"},
    "preview_btn": {"en": "Check the data (dry run)", "zh": "检查数据（试运行）"},
    "preview_help": {"en": "Three rows as the trainer sees them: dim = prompt (no loss), green = trained tokens.",
                     "zh": "训练器看到的三行：灰色 = 提示（不计损失），绿色 = 参与训练的 token。"},
    "common": {"en": "Common settings", "zh": "常用设置"},
    "advanced": {"en": "Advanced", "zh": "高级"},
    "toml": {"en": "The recipe (TOML)", "zh": "配方（TOML）"},
    "download_recipe": {"en": "Download the recipe", "zh": "下载配方"},
    "fit_title": {"en": "Will it fit?", "zh": "显存够吗？"},
    "card": {"en": "GPU memory", "zh": "显卡显存"},
    "start": {"en": "Start", "zh": "开始"},
    "stop": {"en": "Stop (save a checkpoint)", "zh": "停止（保存检查点）"},
    "resume": {"en": "Resume", "zh": "继续"},
    "run_pick": {"en": "Run directory", "zh": "运行目录"},
    "refresh_runs": {"en": "Refresh the list", "zh": "刷新列表"},
    "log": {"en": "Last lines of the log", "zh": "日志最后几行"},
    "fix_fields": {"en": "Fix what is marked in red under:", "zh": "请修改红字标出的字段："},
    "loss_chart": {"en": "Loss (train and eval)", "zh": "损失（训练与验证）"},
    "memory_chart": {"en": "Memory used and peak (GiB)", "zh": "已用与峰值内存（GiB）"},
    "speed_chart": {"en": "Tokens per second", "zh": "每秒 token 数"},
    "empty_chart": {"en": "no points yet", "zh": "还没有数据点"},
    "step_chart": {"en": "step", "zh": "步"},
    "lr_chart": {"en": "Learning rate", "zh": "学习率"},
    "results_refresh": {"en": "Show the results", "zh": "显示结果"},
    "eval_btn": {"en": "Run qlora-kit eval", "zh": "运行 qlora-kit eval"},
    "eval_file": {"en": "Multiple-choice questions (.jsonl: question, options, answer); empty: the run's [eval]",
                  "zh": "选择题文件（.jsonl：question、options、answer）；留空则用运行配方中的 [eval]"},
    "question": {"en": "Your question", "zh": "你的问题"},
    "ask": {"en": "Ask both", "zh": "同时提问"},
    "base_model": {"en": "Base (adapter off)", "zh": "基座模型（关闭适配器）"},
    "tuned_model": {"en": "Fine-tuned", "zh": "微调后"},
    "reasoning": {"en": "reasoning", "zh": "推理过程"},
    "gguf_type": {"en": "GGUF type", "zh": "GGUF 类型"},
    "export_btn": {"en": "Merge, then export GGUF", "zh": "合并，然后导出 GGUF"},
    "export_files": {"en": "Files to download", "zh": "可下载文件"},
    "no_run": {"en": "No run chosen yet: start one on the Train screen or pick one from the list.",
               "zh": "尚未选择运行：请在“训练”页开始一次运行，或从列表中选择。"},
    "status_running": {"en": "running", "zh": "运行中"},
    "status_stopped": {"en": "stopped (resumable)", "zh": "已停止（可继续）"},
    "status_finished": {"en": "finished", "zh": "已完成"},
    "status_failed": {"en": "failed", "zh": "失败"},
    "status_new": {"en": "not started", "zh": "未开始"},
    "fits": {"en": "fits", "zh": "放得下"},
    "no_fit": {"en": "does not fit", "zh": "放不下"},
}


def t(key: str, lang: str = "en") -> str:
    entry = TEXTS[key]
    return entry.get(lang) or entry["en"]
