# Hyperparameter search (config `search`; README "Hyperparameter search"): search.<study>.workers
# worker jobs share one Optuna study, then search_summary writes its tables and best.json, whose
# experiment trains as experiment <study> on every fold (train_fold's experiment_json).
STUDY_PATTERN = "|".join(re.escape(name) for name in SEARCH) or "(?!)"


rule search_worker:
    input:
        stats=rules.preprocess_train.output.stats,
        train_images=rules.preprocess_train.output.train_images,
        train_masks=rules.preprocess_train.output.train_masks,
        folds=rules.make_folds.output.folds,
    output:
        summary=result("search", "{study}", "workers", "worker{worker}.json"),
    log:
        result("logs", "search_worker", "{study}_worker{worker}.log"),
    benchmark:
        result("benchmarks", "search_worker", "{study}_worker{worker}.tsv")
    wildcard_constraints:
        study=STUDY_PATTERN,
        worker=r"\d+",
    conda:
        CONDA_ENV
    # The workers share max_threads, so on a CPU-only machine they run at once too.
    threads: search_worker_threads
    resources:
        **job_resources("search_worker", mem_mb=8000, runtime=480),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("search-worker"),
        search=lambda wildcards: search_json(wildcards.study),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        # Outside the declared outputs, like train's resume folders.
        work_dir=lambda wildcards: result(".search", wildcards.study),
    shell:
        "segflow search-worker --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
        " --search {params.search:q} --worker {wildcards.worker:q}"
        " --work-dir {params.work_dir:q} --out {output.summary:q}"
        " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"


# A checkpoint: the best experiment's training reads best.json (search_inputs, experiment_json).
checkpoint search_summary:
    input:
        workers=lambda wildcards: [
            result("search", wildcards.study, "workers", f"worker{worker}.json")
            for worker in range(SEARCH[wildcards.study]["workers"])
        ],
        stats=rules.preprocess_train.output.stats,
        folds=rules.make_folds.output.folds,
    output:
        trials=result("search", "{study}", "trials.csv"),
        best=result("search", "{study}", "best.json"),
        importance=result("search", "{study}", "importance.csv"),
    log:
        result("logs", "search_summary", "{study}.log"),
    benchmark:
        result("benchmarks", "search_summary", "{study}.tsv")
    wildcard_constraints:
        study=STUDY_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("search_summary", 1)
    resources:
        **job_resources("search_summary", mem_mb=4000, runtime=30),
    params:
        code=stage_fingerprint("search-summary"),
        search=lambda wildcards: search_json(wildcards.study),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.best),
    shell:
        "segflow search-summary --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
        " --search {params.search:q} --out-dir {params.out_dir:q} 2> {log:q}"
