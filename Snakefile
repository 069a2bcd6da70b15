from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/budget.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/report.smk"


# Light jobs run on the submitting machine under a cluster executor (profiles/slurm): queueing
# them would take longer than running them.
localrules:
    all,
    generate_demo_data,
    select_pseudo,
    choose,
    final_submission,
    search_summary,


rule all:
    default_target: True
    input:
        rules.preprocess_train.output,
        rules.make_folds.output,
        rules.choose.output,
        rules.final_submission.output,
        rules.report.output,
        # experiments.<name>.refit: the full models, also when the test set uses the folds
        # (not when test_models auto chose the folds: then none is trained).
        refit_models,


check_cluster_rules()
