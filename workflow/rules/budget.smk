# The time budget (config `budget`): only trainings of a run with budget.minutes set depend on
# this rule (common.smk budget_inputs); without a budget it is never part of the DAG.
#
# With a run experiment's refit.test_models auto (common.smk REFIT_AUTO) plan_budget is a
# checkpoint: the plan chooses whether the full refit or the folds predict the test set, and
# the jobs that merge test predictions (common.smk refit_choice) wait for it. Otherwise it stays
# a plain rule, the same job: a checkpoint anywhere in the workflow changes how Snakemake treats
# --allowed-rules, refuses --immediate-submit and defers temp-file removal. Snakemake fixes a
# rule's kind where it is declared, so the rule is declared in two branches around one body.


PLAN_BUDGET_INPUT = dict(
    stats=rules.preprocess_images.output.stats,
    train_images=rules.preprocess_images.output.train_images,
    train_masks=rules.preprocess_images.output.train_masks,
    test_images=rules.preprocess_images.output.test_images,
    folds=rules.make_folds.output.folds,
)
PLAN_BUDGET_OUTPUT = dict(plan=result("budget", "plan.json"))
PLAN_BUDGET_LOG = result("logs", "plan_budget.log")
PLAN_BUDGET_BENCHMARK = result("benchmarks", "plan_budget.tsv")
# It times training as train_fold runs: with its threads (and a GPU when it has one).
PLAN_BUDGET_THREADS = rule_threads("plan_budget", rule_threads("train_fold", MAX_THREADS))
PLAN_BUDGET_RESOURCES = dict(
    **job_resources("plan_budget", mem_mb=8000, runtime=30),
    gpu_slots=GPUS,
)
PLAN_BUDGET_PARAMS = dict(
    code=stage_fingerprint("plan-budget"),
    flags=section_flags("budget"),
    # The plan is cached: it is made again when these or the data change, never because
    # a timing would come out differently (force it with `snakemake -R plan_budget`).
    experiments=budget_experiments(),
    predict=json.dumps(
        {k: v for k, v in config["predict"].items() if k != "fold_merge"},
        sort_keys=True,
    ),
    pseudo_rounds=PSEUDO["rounds"],
    max_pseudo_share=PSEUDO["max_pseudo_share"],
    predict_threads=rule_threads("predict_oof", min(2, MAX_THREADS)),
    gpus=GPUS,  # budget.parallel_jobs null follows it
    arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
)
PLAN_BUDGET_SHELL = (
    "segflow plan-budget --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
    " --experiments {params.experiments:q} --predict {params.predict:q}"
    " --pseudo-rounds {params.pseudo_rounds:q}"
    " --max-pseudo-share {params.max_pseudo_share:q}"
    " --predict-threads {params.predict_threads:q} {params.flags} --out {output.plan:q}"
    " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"
)


if REFIT_AUTO:

    checkpoint plan_budget:
        input:
            **PLAN_BUDGET_INPUT,
        output:
            **PLAN_BUDGET_OUTPUT,
        log:
            PLAN_BUDGET_LOG,
        benchmark:
            PLAN_BUDGET_BENCHMARK
        conda:
            CONDA_ENV
        threads: PLAN_BUDGET_THREADS
        resources:
            **PLAN_BUDGET_RESOURCES,
        params:
            **PLAN_BUDGET_PARAMS,
        shell:
            PLAN_BUDGET_SHELL

else:

    rule plan_budget:
        input:
            **PLAN_BUDGET_INPUT,
        output:
            **PLAN_BUDGET_OUTPUT,
        log:
            PLAN_BUDGET_LOG,
        benchmark:
            PLAN_BUDGET_BENCHMARK
        conda:
            CONDA_ENV
        threads: PLAN_BUDGET_THREADS
        resources:
            **PLAN_BUDGET_RESOURCES,
        params:
            **PLAN_BUDGET_PARAMS,
        shell:
            PLAN_BUDGET_SHELL
