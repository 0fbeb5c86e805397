DROP TABLE stats_rollup_marks;
