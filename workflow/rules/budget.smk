# The time budget (config `budget`): only trainings of a run with budget.minutes set depend on
# this rule (common.smk budget_inputs); without a budget it is never part of the DAG.
#
# The plans cost predicting the test set from the test images' count alone (a param,
# common.smk test_image_count; the prediction is timed on train images): new or replaced test
# images of the same count re-plan nothing, but a test set of another size re-plans, and so
# retrains, under a time budget.
#
# With a run experiment's refit.test_models auto (common.smk REFIT_AUTO) plan_budget is a
# checkpoint: the plan chooses whether the full refit or the folds predict the test set, and the
# jobs that merge test predictions (common.smk refit_choice) wait for it. Otherwise it stays a
# plain rule, the same job: a checkpoint anywhere in the workflow changes how Snakemake treats
# --allowed-rules, refuses --immediate-submit and defers temp-file removal. A rule's kind is
# fixed where it is declared, so it is declared twice, identical but for the keyword (kept so by
# tests/test_budget.py); literal, as the shell-quoting audit reads it (tests/test_security.py).


if REFIT_AUTO:

    checkpoint plan_budget:
        input:
            stats=rules.preprocess_train.output.stats,
            train_images=rules.preprocess_train.output.train_images,
            train_masks=rules.preprocess_train.output.train_masks,
            folds=rules.make_folds.output.folds,
        output:
            plan=result("budget", "plan.json"),
        log:
            result("logs", "plan_budget.log"),
        benchmark:
            result("benchmarks", "plan_budget.tsv")
        conda:
            CONDA_ENV
        # It times training as train_fold runs: with its threads (and a GPU when it has one).
        threads: rule_threads("plan_budget", rule_threads("train_fold", MAX_THREADS))
        resources:
            **job_resources("plan_budget", mem_mb=8000, runtime=30),
            gpu_slots=GPUS,
        params:
            code=stage_fingerprint("plan-budget"),
            # With folds.train_folds set, the trained folds only (train_folds_flag).
            flags=section_flags(
                "budget", exclude=RESOLUTION_KEYS, extra=train_folds_flag()
            ),
            # The plan is cached: it is made again when these or the data change, never because
            # a timing would come out differently (force it with `snakemake -R plan_budget`).
            experiments=budget_experiments(),
            predict=json.dumps(
                {k: v for k, v in config["predict"].items() if k != "fold_merge"},
                sort_keys=True,
            ),
            pseudo_rounds=PSEUDO["rounds"],
            max_pseudo_share=PSEUDO["max_pseudo_share"],
            # The test images' count, not the images: the plan never reads the test set.
            n_test=test_image_count(),
            predict_threads=rule_threads("predict_oof", min(2, MAX_THREADS)),
            gpus=GPUS,  # budget.parallel_jobs null follows it
            arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        shell:
            "segflow plan-budget --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
            " --experiments {params.experiments:q} --predict {params.predict:q}"
            " --pseudo-rounds {params.pseudo_rounds:q}"
            " --max-pseudo-share {params.max_pseudo_share:q} --n-test {params.n_test:q}"
            " --predict-threads {params.predict_threads:q} {params.flags} --out {output.plan:q}"
            " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"

else:

    rule plan_budget:
        input:
            stats=rules.preprocess_train.output.stats,
            train_images=rules.preprocess_train.output.train_images,
            train_masks=rules.preprocess_train.output.train_masks,
            folds=rules.make_folds.output.folds,
        output:
            plan=result("budget", "plan.json"),
        log:
            result("logs", "plan_budget.log"),
        benchmark:
            result("benchmarks", "plan_budget.tsv")
        conda:
            CONDA_ENV
        # It times training as train_fold runs: with its threads (and a GPU when it has one).
        threads: rule_threads("plan_budget", rule_threads("train_fold", MAX_THREADS))
        resources:
            **job_resources("plan_budget", mem_mb=8000, runtime=30),
            gpu_slots=GPUS,
        params:
            code=stage_fingerprint("plan-budget"),
            # With folds.train_folds set, the trained folds only (train_folds_flag).
            flags=section_flags(
                "budget", exclude=RESOLUTION_KEYS, extra=train_folds_flag()
            ),
            # The plan is cached: it is made again when these or the data change, never because
            # a timing would come out differently (force it with `snakemake -R plan_budget`).
            experiments=budget_experiments(),
            predict=json.dumps(
                {k: v for k, v in config["predict"].items() if k != "fold_merge"},
                sort_keys=True,
            ),
            pseudo_rounds=PSEUDO["rounds"],
            max_pseudo_share=PSEUDO["max_pseudo_share"],
            # The test images' count, not the images: the plan never reads the test set.
            n_test=test_image_count(),
            predict_threads=rule_threads("predict_oof", min(2, MAX_THREADS)),
            gpus=GPUS,  # budget.parallel_jobs null follows it
            arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        shell:
            "segflow plan-budget --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
            " --experiments {params.experiments:q} --predict {params.predict:q}"
            " --pseudo-rounds {params.pseudo_rounds:q}"
            " --max-pseudo-share {params.max_pseudo_share:q} --n-test {params.n_test:q}"
            " --predict-threads {params.predict_threads:q} {params.flags} --out {output.plan:q}"
            " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"


# budget.sizes: only preprocess_train of a run with budget.sizes set depends on
# plan_resolution (common.smk resolution_inputs); otherwise it is not in the DAG.


rule plan_resolution:
    input:
        manifest=rules.ingest_train.output.manifest,
        # Folds come from the dedup output, not from preprocess: the choice runs before it.
        folds=rules.make_folds.output.folds,
    output:
        resolution=result("budget", "resolution.json"),
    log:
        result("logs", "plan_resolution.log"),
    benchmark:
        result("benchmarks", "plan_resolution.tsv")
    conda:
        CONDA_ENV
    # It times training as train_fold runs: with its threads (and a GPU when it has one).
    threads: rule_threads("plan_resolution", rule_threads("train_fold", MAX_THREADS))
    resources:
        **job_resources("plan_resolution", mem_mb=8000, runtime=30),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("plan-resolution"),
        # Cached like the plan: made again when these or the data change, not because a
        # timing would differ (force it with `snakemake -R plan_resolution`).
        flags=section_flags("budget", exclude=RESOLUTION_KEYS, extra=train_folds_flag()),
        sizes=json.dumps(BUDGET["sizes"]),
        resize_mode=config["preprocess"]["resize_mode"],
        channels=config["preprocess"]["channels"],
        experiments=budget_experiments(),
        predict=json.dumps(
            {k: v for k, v in config["predict"].items() if k != "fold_merge"},
            sort_keys=True,
        ),
        pseudo_rounds=PSEUDO["rounds"],
        max_pseudo_share=PSEUDO["max_pseudo_share"],
        n_test=test_image_count(),
        predict_threads=rule_threads("predict_oof", min(2, MAX_THREADS)),
        gpus=GPUS,
    shell:
        "segflow plan-resolution --manifest {input.manifest:q} --folds {input.folds:q}"
        " --sizes {params.sizes:q}"
        " --resize-mode {params.resize_mode:q} --channels {params.channels:q}"
        " --experiments {params.experiments:q} --predict {params.predict:q}"
        " --pseudo-rounds {params.pseudo_rounds:q}"
        " --max-pseudo-share {params.max_pseudo_share:q} --n-test {params.n_test:q}"
        " --predict-threads {params.predict_threads:q} {params.flags} --out {output.resolution:q}"
        " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"
